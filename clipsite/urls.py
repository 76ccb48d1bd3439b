from django.contrib import admin
from django.urls import include, path

from clipsite import demo
from embeddings import urls as embeddings_urls
from embeddings import views as embeddings_views

urlpatterns = [
    path("healthz", embeddings_views.healthz, name="healthz"),
    path("readyz", embeddings_views.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("", include(demo.urlpatterns)),
    path("", include("embeddings.urls")),
    path("", include("wearable.urls")),
    *embeddings_urls.fallback_patterns,
]
