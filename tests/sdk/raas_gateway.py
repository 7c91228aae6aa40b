"""Tango's own Python SDK (raas 2.2.0), unchanged, against the gateway.

Usage: python raas_gateway.py BASE_URL CALLER KEY OWN_ACCOUNT OWN_CUSTOMER OTHER_ACCOUNT

Only what a store changes is set: the base URL, the platform name (the caller's name) and the
platform key (the caller's gateway key). Prints one JSON object with what each call returned or
raised; the Rust test asserts on it.
"""
import json
import logging
import sys

from raas.configuration import Configuration
from raas.exceptions.api_exception import APIException
from raas.models.create_order_request_model import CreateOrderRequestModel
from raas.raas_client import RaasClient

# The SDK logs every call at INFO to stdout; stdout carries the result here.
logging.disable(logging.CRITICAL)

base, caller, key, account, customer, other = sys.argv[1:7]
Configuration.environments[Configuration.environment][Configuration.Server.DEFAULT] = base


def attempt(call):
    try:
        return {"ok": True, "value": call()}
    except APIException as e:
        return {
            "ok": False,
            "exception": type(e).__name__,
            "reason": str(e),
            "status": e.response_code,
        }


client = RaasClient(platform_name=caller, platform_key=key)
out = {}
out["catalog"] = attempt(lambda: len(client.catalog.get_catalog().brands))
out["account"] = attempt(lambda: client.accounts.get_account(account).account_identifier)
order = CreateOrderRequestModel(
    account_identifier=account,
    amount=5.0,
    customer_identifier=customer,
    send_email=False,
    utid="U000001",
    external_ref_id="sdk" + caller.replace("-", ""),
)
placed = attempt(lambda: client.orders.create_order(order))
out["order"] = {k: v for k, v in placed.items() if k != "value"}
if placed["ok"]:
    reference = placed["value"].reference_order_id
    out["order"]["reference"] = reference
    out["read_back"] = attempt(lambda: client.orders.get_order(reference).reference_order_id)
out["other_account"] = attempt(lambda: client.accounts.get_account(other).account_identifier)

wrong = RaasClient(platform_name=caller, platform_key=key + "-wrong")
out["wrong_key"] = attempt(lambda: len(wrong.catalog.get_catalog().brands))

print(json.dumps(out))
