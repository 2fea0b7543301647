"""heinfer_client: the SDK and the `heinfer` command line for encrypted inference.

    from heinfer_client import Client
    s = Client(url, api_key).model("fmnist-cryptonets").session()
    print(s.predict(image).label_name)

Needs numpy, tenseal, httpx, pydantic and Pillow (images, imported when one is read); never
FastAPI, uvicorn, torch or the server package. Where the URL and the API key come from:
heinfer_client.config (flag or argument > HEINFER_URL/HEINFER_API_KEY > config file).
"""

from heinfer_client.errors import (
    APIError,
    AuthError,
    BadRequestError,
    ClientError,
    IncompatibleSpecError,
    InsecureSpecError,
    NotFoundError,
    PlanChangedError,
    ServerBusyError,
    SessionExpiredError,
    TransportError,
)
from heinfer_client.sdk import Client, Model, Prediction, Session

__all__ = ["Client", "Model", "Session", "Prediction", "ClientError", "APIError", "AuthError",
           "BadRequestError", "IncompatibleSpecError", "InsecureSpecError", "NotFoundError",
           "PlanChangedError", "ServerBusyError", "SessionExpiredError", "TransportError"]
