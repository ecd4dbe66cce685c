"""A minimal Django project in one module, served through the tunnel by the tests."""
import django
from django.conf import settings

settings.configure(
    DEBUG=False, SECRET_KEY="tests-only", ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[], INSTALLED_APPS=[], USE_TZ=True,
)
django.setup()

from django.http import HttpResponse, JsonResponse, StreamingHttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


def hello(request):
    return HttpResponse("Hello from Django")


@csrf_exempt
def echo(request):
    return JsonResponse({"method": request.method, "body": request.body.decode(),
                         "host": request.get_host(), "remote": request.META["REMOTE_ADDR"],
                         "query": request.GET.dict()})


def stream(request):
    return StreamingHttpResponse((f"line {i}\n" for i in range(3)), content_type="text/plain")


urlpatterns = [path("hello", hello), path("echo", echo), path("stream", stream)]

from django.core.wsgi import get_wsgi_application  # noqa: E402

application = get_wsgi_application()
