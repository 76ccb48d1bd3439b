from django.urls import path, re_path

from embeddings import views

urlpatterns = [
    path("syte_test/embeddings", views.EmbeddingsView.as_view(), name="embeddings"),
    path("syte_test/embeddings/", views.EmbeddingsView.as_view()),
    # The path of the original example request.
    path("syte_test/clip", views.EmbeddingsView.as_view(), name="clip"),
]

# Last among the API's routes (see clipsite/urls.py): unknown API paths answer in the API's error shape.
fallback_patterns = [re_path(r"^syte_test/", views.api_not_found)]
