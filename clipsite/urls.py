from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from clipsite import demo
from embeddings import urls as embeddings_urls
from embeddings import views as embeddings_views

urlpatterns = [
    path("healthz", embeddings_views.healthz, name="healthz"),
    path("readyz", embeddings_views.readyz, name="readyz"),
    # The edge middleware answers GET and HEAD first, whatever the Host header (a scraper uses the address).
    path("metrics", embeddings_views.metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("", include(demo.urlpatterns)),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("", include("embeddings.urls")),
    path("", include("wearable.urls")),
    *embeddings_urls.fallback_patterns,
]
