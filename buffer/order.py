"""The order document: what a storefront sends and what ``body`` in a stream entry holds.

Field constraints live here, once, for both sides. Cross-field rules (the total, the currency
code) are checked by the gateway's validation before admission; workers trust an entry's body
only as far as decoding it with these types.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

MAX_ITEMS = 500
MAX_QUANTITY = 10_000
MAX_METADATA_KEYS = 20
MAX_METADATA_BYTES = 2048

# No control characters (Cc: C0, DEL, C1), no invisible format characters (Cf: bidi overrides
# and isolates, zero-width ones, the soft hyphen, the BOM) and no line or paragraph separators:
# an id shows the same wherever it is printed, and one id cannot pose as another.
_NOT_IN_IDS = (
    "\x00-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u180e\u200b-\u200f"
    "\u0890\u0891\u08e2\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f"
)
Id64 = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=f"^[^{_NOT_IN_IDS}]+$")]
Email = Annotated[
    str, msgspec.Meta(min_length=3, max_length=254, pattern=r"^[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+$")
]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
MinorUnits = Annotated[int, msgspec.Meta(ge=0, le=2**62)]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=MAX_QUANTITY)]
# No NUL anywhere: PostgreSQL's jsonb cannot store \u0000, so such an order could never commit.
MetaText = Annotated[str, msgspec.Meta(max_length=1024, pattern=r"^[^\x00]*$")]
MetaValue = MetaText | int | float | bool | None
MetaKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[^\x00]+$")]


class Customer(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    id: Id64
    email: Email | None = None


class Item(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Id64
    quantity: Quantity
    unit_price_minor: MinorUnits


class Order(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    storefront_order_id: Id64
    customer: Customer
    items: Annotated[list[Item], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]
    currency: Currency
    total_minor: MinorUnits
    metadata: dict[MetaKey, MetaValue] | None = None


ORDER_DECODER = msgspec.json.Decoder(Order)
ORDER_ENCODER = msgspec.json.Encoder()
