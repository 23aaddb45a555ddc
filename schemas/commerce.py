"""Merchant orders for the checkout opt-in (#15): `commerce.orders` and what becomes of them.

- `commerce.orders` (written by a merchant's system, any key): `Order`. An order names the person
  the way the merchant knows them: `user_ref` (the checkbox plugin's), `psid`, or only the `ref` the
  opt-in carried (Send to Messenger's `data-ref`). A later record with the same `order_id` and a
  changed content is an update of that order.
- `commerce.orders.unmatched` (compacted, key `order_id`): `UnmatchedOrder`, an order that met no
  opt-in within `optin.match_window_seconds` (or could not wait): kept and reported, never dropped.

Money amounts are JSON numbers in the order's currency (Meta's receipt template takes them so).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from schemas.webhook import as_id

Id = Annotated[str, BeforeValidator(as_id)]
Money = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
ITEMS_MAX = 100  # Meta: a receipt has at most 100 elements


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class OrderItem(_Model):
    title: str = Field(min_length=1, max_length=200)
    subtitle: str | None = Field(default=None, max_length=200)
    quantity: int = Field(default=1, ge=1, le=1_000_000)
    price: Money
    currency: str | None = Field(default=None, min_length=3, max_length=3)
    image_url: str | None = Field(default=None, max_length=1000, pattern=r"^https?://")


class Address(_Model):
    street_1: str = Field(min_length=1, max_length=200)
    street_2: str | None = Field(default=None, max_length=200)
    city: str = Field(min_length=1, max_length=100)
    postal_code: str = Field(min_length=1, max_length=20)
    state: str = Field(default="", max_length=100)
    country: str = Field(min_length=2, max_length=2, description="two-letter country code")


class Totals(_Model):
    subtotal: Money | None = None
    shipping_cost: Money | None = None
    total_tax: Money | None = None
    total_cost: Money


class Adjustment(_Model):
    name: str = Field(min_length=1, max_length=100)
    amount: Money


class Order(_Model):
    """One merchant order (or a later update of it: same `order_id`)."""

    order_id: str = Field(min_length=1, max_length=128, description="the merchant's id: updates repeat it")
    page_id: Id = Field(description="the Facebook page the customer opted in to")
    user_ref: str | None = Field(default=None, min_length=1, max_length=256,
                                 description="the checkbox plugin's user_ref of this checkout")
    psid: Id | None = Field(default=None, description="the customer's PSID, when the merchant knows it")
    ref: str | None = Field(default=None, min_length=1, max_length=250,
                            description="the opt-in's `ref` (Send to Messenger `data-ref`, checkbox `ref`)")
    order_number: str | None = Field(default=None, max_length=128,
                                     description="shown to the customer; default order_id")
    status: str | None = Field(default=None, max_length=64, description="e.g. placed, shipped, delivered")
    note: str | None = Field(default=None, max_length=300, description="a line for the customer with an update")
    recipient_name: str = Field(min_length=1, max_length=128)
    merchant_name: str | None = Field(default=None, max_length=128)
    currency: str = Field(min_length=3, max_length=3, description="ISO 4217 code")
    payment_method: str | None = Field(default=None, max_length=128)
    order_url: str | None = Field(default=None, max_length=1000, pattern=r"^https?://")
    created_at: int | None = Field(default=None, ge=0, description="epoch ms; the receipt's timestamp")
    updated_at: int | None = Field(
        default=None, ge=0,
        description="epoch ms, the version of this order: a record older than one already applied is ignored "
        "(key records by order_id to keep them in order anyway)",
    )
    items: list[OrderItem] = Field(default_factory=list, max_length=ITEMS_MAX)
    totals: Totals
    adjustments: list[Adjustment] = Field(default_factory=list, max_length=20)
    shipping_address: Address | None = None
    billing_address: Address | None = None

    @model_validator(mode="after")
    def _names_the_person(self) -> Order:
        if not (self.user_ref or self.psid or self.ref):
            raise ValueError("an order needs user_ref, psid or ref to meet its opt-in")
        return self


class UnmatchedOrder(_Model):
    """An order that met no opt-in: on `commerce.orders.unmatched` (key `order_id`) and `GET /orders/unmatched`."""

    order_id: str
    page_id: str
    reason: str = Field(description="no_optin (the match window passed), too_many_orders (the key was full)")
    key: str = Field(description="the conversation key where it waited")
    user_ref: str | None = None
    psid: str | None = None
    ref: str | None = None
    order_number: str | None = None
    total_cost: float | None = None
    currency: str | None = None
    received_at: int = Field(description="epoch ms: when the order reached its key")
    reported_at: int
    order: dict[str, Any] = Field(default_factory=dict, description="the order as kept (compact)")
