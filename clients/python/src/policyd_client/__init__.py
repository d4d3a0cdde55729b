"""policyd's Python client: the generated stubs of the contract (`policyd_client.v1`) and a typed
wrapper (`PolicyClient`, `AsyncPolicyClient`) for in-house gateways and other services.

Exceptions:
    PolicydCallError      a call policyd refused or could not answer (.code, .reason, .message)
"""

from policyd_client.client import (
    DEADLINE_SECONDS,
    ENDPOINTS,
    AsyncPolicyClient,
    Decision,
    PolicyClient,
    PolicydCallError,
    Settled,
)

__all__ = [
    "DEADLINE_SECONDS",
    "ENDPOINTS",
    "AsyncPolicyClient",
    "Decision",
    "PolicyClient",
    "PolicydCallError",
    "Settled",
]
