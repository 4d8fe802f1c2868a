"""boto3 clients built one way: region, credentials and endpoint override from Settings, bounded timeouts.

Bounded retries and timeouts everywhere: a stage or the API must fail (and say why) rather than hang while
an AWS endpoint is unreachable.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

from samseg.core.settings import Settings


def client(settings: Settings, service: str, endpoint_url: str | None, **config: Any) -> Any:
    options: dict[str, Any] = {
        "region_name": settings.aws_region,
        "retries": {"max_attempts": 3, "mode": "standard"},
        "connect_timeout": 5,
        "read_timeout": 30,
        **config,
    }
    return boto3.client(  # type: ignore[call-overload]
        service,
        endpoint_url=endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=settings.aws_secret_access_key,
        config=Config(**options),
    )
