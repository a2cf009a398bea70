#!/usr/bin/env python3
"""Seeded demo data for jobs.toml: shop orders (NDJSON files) and customers (gzipped NDJSON)."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import shutil
import sys
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: Share of order lines that are broken in one of four ways (not JSON, no customer.id, items null,
#: no source_id), and share that repeat an earlier source_id with newer data.
INVALID_SHARE = 0.01
REPEAT_SHARE = 0.03
#: Share of customers breaking customer.schema.json, and share repeated with newer data.
CUSTOMER_VIOLATION_SHARE = 0.01
CUSTOMER_REPEAT_SHARE = 0.01
#: Orders are placed over this period, oldest first, so the files read like a chronological export.
START = 1704067200  # 2024-01-01T00:00:00Z
PERIOD = 365 * 24 * 3600

FIRST = ["Anna", "Lukas", "Sofia", "Noah", "Emma", "Mateo", "Léa", "Jonas", "Zoë", "Liam", "Mia", "Elias",
         "Chloé", "Finn", "Olivia", "Hugo", "Amélie", "Luca", "Ingrid", "Oskar", "Maja", "Łukasz", "Nora",
         "José", "Aisha", "Kenji", "Priya", "Tomás", "Sven", "Fatima", "Björn", "Camille", "Giulia", "Omar"]
LAST = ["Schmidt", "Müller", "García", "Rossi", "Dubois", "Jansen", "Nowak", "Smith", "Johansson", "Novák",
        "Fernández", "Bianchi", "Martin", "de Vries", "Kowalski", "Brown", "Andersen", "Lefèvre", "Weber",
        "O'Connor", "Silva", "Horvat", "Papadopoulos", "Nakamura", "Patel", "Yilmaz", "Costa", "Berg"]
PLACES = {  # country: (cities, postal code digits, phone prefix, currency)
    "DE": (["Berlin", "Hamburg", "München", "Köln", "Leipzig"], 5, "+49", "EUR"),
    "FR": (["Paris", "Lyon", "Marseille", "Toulouse", "Nantes"], 5, "+33", "EUR"),
    "NL": (["Amsterdam", "Rotterdam", "Utrecht", "Eindhoven"], 4, "+31", "EUR"),
    "ES": (["Madrid", "Barcelona", "Valencia", "Sevilla"], 5, "+34", "EUR"),
    "IT": (["Roma", "Milano", "Torino", "Bologna"], 5, "+39", "EUR"),
    "PL": (["Warszawa", "Kraków", "Gdańsk", "Wrocław"], 5, "+48", "PLN"),
    "GB": (["London", "Manchester", "Bristol", "Edinburgh"], 0, "+44", "GBP"),
    "US": (["New York", "Chicago", "Austin", "Seattle", "Denver"], 5, "+1", "USD"),
}
STREETS = ["Main Street", "Hauptstraße", "Rue de la Paix", "Kerkstraat", "Calle Mayor", "Via Roma",
           "ulica Długa", "High Street", "Oak Avenue", "Bahnhofstraße", "Lindenweg", "Market Square"]
ADJECTIVES = ["Organic", "Classic", "Recycled", "Slim", "Waterproof", "Vintage", "Compact", "Deluxe",
              "Everyday", "Merino", "Bamboo", "Ceramic", "Linen", "Insulated", "Foldable"]
NOUNS = [("T-Shirt", 19.9), ("Hoodie", 49.0), ("Backpack", 79.0), ("Water Bottle", 24.5), ("Mug", 12.0),
         ("Socks (3 pairs)", 14.9), ("Rain Jacket", 129.0), ("Notebook", 9.5), ("Desk Lamp", 59.0),
         ("Yoga Mat", 39.0), ("Sneakers", 99.0), ("Scarf", 29.0), ("Tote Bag", 15.0), ("Beanie", 22.0),
         ("Headphones", 149.0), ("Phone Case", 25.0), ("Blanket", 69.0), ("Candle", 18.0)]
COLOURS = ["black", "white", "navy", "olive", "sand", "red", "grey", "teal"]
CHANNELS = ["web", "web", "web", "app", "app", "marketplace", "phone"]
SHIPPING = [("standard", 4.95), ("standard", 4.95), ("express", 12.9), ("pickup", 0.0)]
PAYMENTS = ["card", "card", "card", "paypal", "klarna", "bank_transfer", "gift_card"]
TIERS = ["standard", "standard", "standard", "bronze", "silver", "gold"]
#: Order status moves forward in a repeat (a later export of the same order).
NEXT_STATUS = {"pending": "paid", "paid": "shipped", "shipped": "delivered", "delivered": "returned",
               "returned": "refunded", "refunded": "refunded", "cancelled": "cancelled"}
FIRST_STATUS = ["pending", "paid", "paid", "shipped", "shipped", "delivered", "delivered", "cancelled"]


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


TRANSLIT = str.maketrans({"ł": "l", "ø": "o", "æ": "ae", "œ": "oe", "ß": "ss"})


def ascii_slug(text: str) -> str:
    """'Łukasz' -> 'lukasz', "O'Connor" -> 'oconnor': e-mail local parts stay ASCII."""
    text = text.lower().translate(TRANSLIT)
    plain = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in plain if ch.isascii() and ch.isalnum())


def make_address(rng: random.Random, country: str) -> dict[str, Any]:
    cities, digits, _, _ = PLACES[country]
    if digits:
        postal = str(rng.randrange(10 ** (digits - 1), 10**digits))
    else:
        postal = f"{rng.choice('ENSWM')}{rng.randint(1, 20)} {rng.randint(1, 9)}{rng.choice('ABDEFGHJ')}Z"
    return {"street": f"{rng.choice(STREETS)} {rng.randint(1, 180)}", "city": rng.choice(cities),
            "postal_code": postal, "country": country}


def make_customers(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """Valid customers; cus-00001 ... in creation order."""
    customers = []
    countries = list(PLACES)
    for n in range(1, count + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        country = rng.choice(countries)
        prefix = PLACES[country][2]
        customers.append({
            "id": f"cus-{n:05d}",
            "name": f"{first} {last}",
            "email": f"{ascii_slug(first)}.{ascii_slug(last)}{n}@example.{rng.choice(['com', 'org', 'net'])}",
            "phone": f"{prefix} {rng.randint(100, 999)} {rng.randint(1000000, 9999999)}" if rng.random() < 0.8
            else None,
            "created_at": iso(START - PERIOD + n * PERIOD / max(count, 1)),
            "tier": rng.choice(TIERS),
            "marketing_opt_in": rng.random() < 0.4,
            "address": make_address(rng, country),
            "lifetime_value": round(rng.lognormvariate(5, 1), 2),
            "tags": rng.sample(["newsletter", "vip", "b2b", "student", "returning", "wholesale"], rng.randint(0, 2)),
        })
    return customers


def make_products(rng: random.Random) -> list[tuple[str, str, float]]:
    products = []
    for i, (adj, (noun, price)) in enumerate((a, n) for a in ADJECTIVES for n in NOUNS):
        colour = rng.choice(COLOURS)
        products.append((f"SKU-{10000 + i}", f"{adj} {noun}, {colour}", round(price * rng.uniform(0.8, 1.3), 2)))
    return products


def order_totals(order: dict[str, Any]) -> None:
    subtotal = round(sum(item["qty"] * item["unit_price"] for item in order["items"]), 2)
    discount = round(subtotal * order["discount_rate"], 2)
    tax = round((subtotal - discount) * 0.19, 2)
    order["subtotal"], order["discount"], order["tax"] = subtotal, discount, tax
    order["total"] = round(subtotal - discount + tax + order["shipping"]["cost"], 2)


def make_order(rng: random.Random, number: int, placed: float, customers: list[dict[str, Any]],
               products: list[tuple[str, str, float]]) -> dict[str, Any]:
    customer = rng.choice(customers)
    address = customer["address"]
    method, cost = rng.choice(SHIPPING)
    items = []
    for sku, name, price in rng.sample(products, rng.choice([1, 1, 2, 2, 2, 3, 3, 4, 5, 6])):
        items.append({"sku": sku, "name": name, "qty": rng.choice([1, 1, 1, 2, 2, 3]), "unit_price": price,
                      "gift_wrap": rng.random() < 0.05})
    status = rng.choice(FIRST_STATUS)
    order: dict[str, Any] = {
        "source_id": f"ord-{number:06d}",
        "order_number": f"SO-{time.gmtime(placed).tm_year}-{number:06d}",
        "revision": 1,
        "status": status,
        "placed_at": iso(placed),
        "updated_at": iso(placed + rng.randint(60, 3600)),
        "currency": PLACES[address["country"]][3],
        "channel": rng.choice(CHANNELS),
        "customer": {"id": customer["id"], "name": customer["name"], "email": customer["email"],
                     "phone": customer["phone"], "address": address},
        "shipping": {"method": method, "cost": cost,
                     "address": address if rng.random() < 0.85 else make_address(rng, address["country"]),
                     "tracking_number": f"TRK{rng.randrange(10**11, 10**12)}" if status in (
                         "shipped", "delivered") else None},
        "items": items,
        "discount_rate": rng.choice([0, 0, 0, 0, 0.05, 0.1, 0.15]),
        "payment": {"method": rng.choice(PAYMENTS), "status": "authorized" if status == "pending" else "captured"},
        "notes": rng.choice([None, None, None, None, "Leave at the door", "Gift, no invoice in the parcel",
                             "Call before delivery"]),
    }
    order_totals(order)
    return order


def update_order(rng: random.Random, order: dict[str, Any], now: float) -> dict[str, Any]:
    """The same order exported again later: next status, sometimes a changed quantity."""
    order["revision"] += 1
    order["status"] = NEXT_STATUS[order["status"]]
    order["updated_at"] = iso(now)
    if order["status"] in ("shipped", "delivered") and not order["shipping"]["tracking_number"]:
        order["shipping"]["tracking_number"] = f"TRK{rng.randrange(10**11, 10**12)}"
    if order["status"] == "refunded":
        order["payment"]["status"] = "refunded"
    if rng.random() < 0.3:
        rng.choice(order["items"])["qty"] += 1
        order_totals(order)
    return order


def break_order(kind: str, order: dict[str, Any]) -> str:
    if kind == "missing_customer_id":
        del order["customer"]["id"]
    elif kind == "items_null":
        order["items"] = None
    elif kind == "missing_source_id":
        del order["source_id"]
    line = dump(order)
    return line[: len(line) // 2] if kind == "not_json" else line  # a line cut short: not JSON


def dump(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def order_lines(rng: random.Random, count: int, customers: list[dict[str, Any]],
                stats: dict[str, Any]) -> Iterator[str]:
    products = make_products(rng)
    emitted: list[str] = []  # latest version of each valid order, to pick repeats from
    first_seen: list[int] = []  # line number where each of them first appeared
    kinds = ["not_json", "missing_customer_id", "items_null", "missing_source_id"]
    number = 0
    for i in range(count):
        placed = START + PERIOD * i / max(count, 1) + rng.uniform(0, 600)
        roll = rng.random()
        if roll < REPEAT_SHARE and emitted:
            # Half of the repeats follow closely (often the same batch), half come much later.
            pos = rng.randrange(max(0, len(emitted) - 300), len(emitted)) if roll < REPEAT_SHARE / 2 \
                else rng.randrange(len(emitted))
            earlier = json.loads(emitted[pos])
            stats["repeats"].append((first_seen[pos], i))
            line = dump(update_order(rng, earlier, placed))
            emitted[pos] = line  # a further repeat starts from this version
            yield line
            continue
        number += 1
        order = make_order(rng, number, placed, customers, products)
        if roll > 1 - INVALID_SHARE:
            kind = kinds[sum(stats["invalid"].values()) % len(kinds)]
            stats["invalid"][kind] += 1
            yield break_order(kind, order)
            continue
        line = dump(order)
        emitted.append(line)
        first_seen.append(i)
        yield line
    stats["distinct_valid_source_ids"] = len(emitted)


VIOLATIONS = ["lifetime_value_negative", "tier_unknown", "opt_in_not_boolean", "email_without_at",
              "country_lowercase", "id_bad_pattern", "name_missing"]


def customer_lines(rng: random.Random, customers: list[dict[str, Any]], stats: dict[str, Any]) -> Iterator[str]:
    for n, customer in enumerate(customers):
        roll = rng.random()
        record = customer
        if roll < CUSTOMER_VIOLATION_SHARE:
            record = json.loads(dump(customer))
            kind = VIOLATIONS[n % len(VIOLATIONS)]
            stats["violations"][kind] = stats["violations"].get(kind, 0) + 1
            if kind == "lifetime_value_negative":
                record["lifetime_value"] = -round(rng.uniform(1, 500), 2)
            elif kind == "tier_unknown":
                record["tier"] = "platinum"
            elif kind == "opt_in_not_boolean":
                record["marketing_opt_in"] = "yes"
            elif kind == "email_without_at":
                record["email"] = record["email"].replace("@", ".at.")
            elif kind == "country_lowercase":
                record["address"] = {**record["address"], "country": record["address"]["country"].lower()}
            elif kind == "id_bad_pattern":
                record["id"] = record["id"].upper().replace("-", "_")
            else:
                del record["name"]
        if record is customer:
            stats["valid_ids"].add(customer["id"])
        yield dump(record)
        if roll > 1 - CUSTOMER_REPEAT_SHARE and n > 0:
            again = json.loads(dump(customers[rng.randrange(n)]))
            again["tier"] = rng.choice(TIERS[3:])
            again["lifetime_value"] = round(again["lifetime_value"] + rng.uniform(10, 300), 2)
            stats["repeats"] += 1
            stats["valid_ids"].add(again["id"])
            yield dump(again)


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap in the finished folder, so an interrupted run never leaves a half-written one."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def generate(out: Path, orders: int, customers: int, seed: int, files: int) -> dict[str, Any]:
    rng = random.Random(seed)
    people = make_customers(rng, max(customers, 1))
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"seed": seed}

    ostats: dict[str, Any] = {"lines": orders, "files": [], "repeats": [],
                              "invalid": {"not_json": 0, "missing_customer_id": 0, "items_null": 0,
                                          "missing_source_id": 0}}
    tmp = out / f".orders.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    per_file = max(1, math.ceil(orders / max(files, 1)))
    lines = order_lines(random.Random(seed + 1), orders, people, ostats)
    start = 0
    while start < orders:
        name = f"orders-{len(ostats['files']):03d}.ndjson"
        chunk = [next(lines) for _ in range(min(per_file, orders - start))]
        with open(tmp / name, "w", encoding="utf-8", newline="\n") as fh:
            fh.write("\n".join(chunk) + "\n")
        ostats["files"].append({"name": name, "lines": len(chunk)})
        start += len(chunk)
    for _ in lines:  # exhaust the generator: it fills in the last counts
        pass
    repeats = ostats.pop("repeats")
    ostats["repeats"] = len(repeats)
    ostats["repeats_in_another_file"] = sum(1 for first, line in repeats if first // per_file != line // per_file)
    # Same batch of the orders job (batch_size 1000 in jobs.toml): one upsert sees the id twice.
    ostats["repeats_within_1000_lines"] = sum(1 for first, line in repeats if line - first < 1000)
    ostats["invalid_total"] = sum(ostats["invalid"].values())
    replace_dir(tmp, out / "orders")
    manifest["orders"] = ostats

    cstats: dict[str, Any] = {"records": 0, "repeats": 0, "violations": {}, "valid_ids": set()}
    tmp = out / f".customers.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    crng = random.Random(seed + 2)
    with open(tmp / "customers.ndjson.gz", "wb") as raw, \
            gzip.GzipFile(filename="customers.ndjson", mode="wb", fileobj=raw, mtime=0) as gz:
        data = [line for line in customer_lines(crng, people[:customers], cstats)]
        gz.write(("\n".join(data) + "\n").encode("utf-8") if data else b"")
    cstats["records"] = len(data)
    cstats["violations_total"] = sum(cstats["violations"].values())
    cstats["distinct_valid_ids"] = len(cstats.pop("valid_ids"))
    replace_dir(tmp, out / "customers")
    manifest["customers"] = cstats
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "data",
                        help="data folder to write orders/, customers/ and manifest.json into (default: data/)")
    parser.add_argument("--orders", type=int, default=50_000, help="order lines in total (default 50000)")
    parser.add_argument("--customers", type=int, default=5_000, help="customers (default 5000)")
    parser.add_argument("--files", type=int, default=5, help="order files to spread the lines over (default 5)")
    parser.add_argument("--seed", type=int, default=42, help="same seed, same bytes (default 42)")
    args = parser.parse_args(argv)
    if args.orders < 0 or args.customers < 1 or args.files < 1:
        parser.error("--orders must be >= 0, --customers and --files >= 1")
    began = time.monotonic()
    manifest = generate(args.out, args.orders, args.customers, args.seed, args.files)
    o, c = manifest["orders"], manifest["customers"]
    print(f"{args.out}/orders: {o['lines']} lines in {len(o['files'])} files, {o['distinct_valid_source_ids']} "
          f"distinct valid orders, {o['repeats']} repeats, {o['invalid_total']} invalid; "
          f"{args.out}/customers: {c['records']} records, {c['violations_total']} schema violations "
          f"({time.monotonic() - began:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
