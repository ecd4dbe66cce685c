"""A minimal Django project in one module, to expose through a reverst tunnel.

No settings.py and no manage.py: ``settings.configure()`` below is the whole project.
``application`` is the WSGI callable, as ``get_wsgi_application()`` gives in any Django
project, so ``reverst.client.serve(application, ...)`` (or ``reverst wsgi app:application``)
is all it takes to publish it.
"""
import hashlib
import time

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="reverst-example-only",  # use a real secret in a real project
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],  # reverstd passes the public Host through
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    USE_TZ=True,
)
django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpResponse, HttpResponseNotAllowed, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.csrf import csrf_exempt  # noqa: E402


def index(request):
    return HttpResponse("Hello from Django, through a reverst tunnel!\n", content_type="text/plain")


def api_time(request):
    return JsonResponse({"time": time.time(), "host": request.get_host(),
                         "client": request.META.get("REMOTE_ADDR")})


@csrf_exempt
def upload(request):
    """Streams the body through SHA-256 without holding it in memory.

    With a Content-Length, Django's request is a file-like limited to it.  A chunked
    upload has none (Django would see an empty body), so read ``wsgi.input`` to its end:
    reverst sets ``wsgi.input_terminated``.
    """
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    if request.META.get("CONTENT_LENGTH"):
        read = request.read
    else:
        read = request.META["wsgi.input"].read
    digest, size = hashlib.sha256(), 0
    while chunk := read(65536):
        digest.update(chunk)
        size += len(chunk)
    return JsonResponse({"size": size, "sha256": digest.hexdigest()})


urlpatterns = [path("", index), path("api/time", api_time), path("upload", upload)]

application = get_wsgi_application()
