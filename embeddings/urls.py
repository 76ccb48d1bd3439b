from django.urls import path, re_path

from embeddings import views

urlpatterns = [
    path("syte_test/embeddings", views.EmbeddingsView.as_view(), name="embeddings"),
    path("syte_test/embeddings/", views.EmbeddingsView.as_view()),
    # The path of the original example request.
    path("syte_test/clip", views.EmbeddingsView.as_view(), name="clip"),
    # OpenAI-compatible: what tools that speak OpenAI's embeddings API call (base_url=.../v1).
    path("v1/embeddings", views.OpenAiEmbeddingsView.as_view(), name="openai-embeddings"),
    path("v1/models", views.OpenAiModelsView.as_view(), name="openai-models"),
    path("v1/models/<path:model_id>", views.OpenAiModelView.as_view(), name="openai-model"),
]

# Last among the API's routes (see clipsite/urls.py): unknown API paths answer in the API's error shape.
fallback_patterns = [re_path(r"^syte_test/", views.api_not_found), re_path(r"^v1/", views.api_not_found)]
