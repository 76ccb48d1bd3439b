from django.urls import path

from wearable import views

urlpatterns = [
    path("syte_test/wearable", views.WearableView.as_view(), name="wearable"),
    path("syte_test/wearable/", views.WearableView.as_view()),
    path("syte_test/feedback", views.FeedbackView.as_view(), name="feedback"),
    path("syte_test/feedback/", views.FeedbackView.as_view()),
]
