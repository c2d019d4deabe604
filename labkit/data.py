"""Deterministic, streamed synthetic data for the lessons: the VehicleSales XML export.

The memory lesson needs XML files of a chosen size — tens of MB in a notebook,
gigabytes in a workshop — that look like the dealer-management export from the
2014 talk::

    <?xml version="1.0" encoding="UTF-8"?>
    <VehicleSales>
      <VehicleSale>
        <CRMSaleType>1</CRMSaleType>
        <BuyRateAPR>0.2081</BuyRateAPR>
        ...
        <CostPrice>11087.25</CostPrice>
      </VehicleSale>
      ...
    </VehicleSales>

:func:`vehicle_sales` writes such a file of *exactly* the requested size:

* **Deterministic**: the same ``(size, seed)`` gives byte-identical files on any
  machine (one ``random.Random(seed)`` draws every field; only ``random()`` is
  used, whose sequence Python keeps stable across versions). A smaller file is
  a prefix of a bigger one with the same seed, up to its padding and closing tag.
* **Streamed**: records are formatted in batches and written as they are made,
  so generating 2 GB uses as little memory as generating 2 MB — the lesson's
  own advice, applied to its data.
* **Cached**: files land in ``data/generated/`` (git-ignored; ``LABKIT_DATA_DIR``
  moves it) under a name holding size, seed and format version, and are written
  to a temporary name first, then renamed, so a half-written file is never
  mistaken for a finished one — not even by a test running in parallel.

Command line: ``labkit data vehicle-sales --size 200MB --out sales.xml``.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

FORMAT_VERSION = 1
RECORD_TAG = "VehicleSale"
ROOT_TAG = "VehicleSales"
DEALER_TAG = "Dealer"
FIELDS = (
    "CRMSaleType", "BuyRateAPR", "APR", "BackGross", "BodyStyle",
    "Branch", "CashDown", "CashPrice", "CostPrice",
)
BODY_STYLES = ("HB", "SD", "SUV", "PU", "CP", "VN", "WG", "CV")
REGIONS = ("North", "South", "East", "West", "Central")
HEADER = f'<?xml version="1.0" encoding="UTF-8"?>\n<{ROOT_TAG}>\n'
FOOTER = f"</{ROOT_TAG}>\n"
BATCH = 2000  # records formatted per write: bounds the generator's own memory
PROGRESS_FROM = 64 * 10**6  # bytes; show a progress bar from this size on (when progress=None)

_UNITS = {"": 10**6, "b": 1, "kb": 10**3, "k": 10**3, "mb": 10**6, "m": 10**6, "gb": 10**9, "g": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}

_SALE = (
    "  <VehicleSale>\n"
    "    <CRMSaleType>{0}</CRMSaleType>\n"
    "    <BuyRateAPR>{1:.4f}</BuyRateAPR>\n"
    "    <APR>{2:.2f}</APR>\n"
    "    <BackGross>{3:.2f}</BackGross>\n"
    "    <BodyStyle>{4}</BodyStyle>\n"
    "    <Branch>{5}</Branch>\n"
    "    <CashDown>{6:.2f}</CashDown>\n"
    "    <CashPrice>{7:.2f}</CashPrice>\n"
    "    <CostPrice>{8:.2f}</CostPrice>\n"
    "  </VehicleSale>\n"
)
_DEALER = (
    "  <Dealer>\n"
    "    <Branch>{0}</Branch>\n"
    "    <Name>Dealer {0}</Name>\n"
    "    <Region>{1}</Region>\n"
    "  </Dealer>\n"
)


def parse_size(size: str | int | float) -> int:
    """Bytes from ``"44MB"``, ``"500kB"``, ``"1.5GiB"`` or a plain number of bytes.

    A bare number in a string (``"44"``) means megabytes, as on the command line.
    """
    if isinstance(size, int | float):
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {size!r}: use e.g. 44MB, 500kB, 1.5GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def data_dir() -> Path:
    """Where generated files are cached: ``$LABKIT_DATA_DIR``, else the repository's ``data/generated``."""
    env = os.environ.get("LABKIT_DATA_DIR")
    if env:
        return Path(env)
    repo_data = Path(__file__).resolve().parents[1] / "data"
    if repo_data.is_dir():
        return repo_data / "generated"
    return Path.home() / ".cache" / "labkit" / "data"


def sample_path() -> Path:
    """The small committed sample (a few KB), the same generator's output at seed 0."""
    return Path(__file__).resolve().parents[1] / "data" / "vehicle-sales-sample.xml"


def _sales(rng: random.Random) -> Iterator[str]:
    """One formatted ``<VehicleSale>`` record after another, drawn from ``rng``."""
    r = rng.random
    styles, n_styles = BODY_STYLES, len(BODY_STYLES)
    while True:
        cash_price = 6000 + r() * 54000
        yield _SALE.format(
            1 + int(r() * 3),
            0.01 + r() * 0.24,
            2.0 + r() * 23.0,
            r() * 4000,
            styles[int(r() * n_styles)],
            100 + int(r() * 900),
            int(r() * 11) * 500,
            cash_price,
            cash_price * (0.70 + r() * 0.22),
        )


def _records(rng: random.Random, dealer_every: int) -> Iterator[str]:
    """Sales, with a ``<Dealer>`` record after every ``dealer_every`` sales when that is > 0."""
    for i, sale in enumerate(_sales(rng), 1):
        yield sale
        if dealer_every and i % dealer_every == 0:
            yield _DEALER.format(100 + int(rng.random() * 900), REGIONS[int(rng.random() * len(REGIONS))])


def write_vehicle_sales(fh: IO[bytes], size: int, seed: int = 0, *, dealer_every: int = 0,
                        progress: bool = False) -> int:
    """Write a VehicleSales document of exactly ``size`` bytes to ``fh``; return the number of sales.

    Records are added while the next one (and the closing tag) still fits; the
    remaining few bytes (fewer than one record) are whitespace before the closing tag.
    """
    head, foot = HEADER.encode(), FOOTER.encode()
    if size < len(head) + len(foot):
        raise ValueError(f"size {size} B is too small for even an empty document ({len(head) + len(foot)} B)")
    from tqdm.auto import tqdm  # noqa: PLC0415 - a notebook gets a widget bar, a terminal a text bar

    rng = random.Random(seed)
    records = _records(rng, dealer_every)
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"VehicleSales {size / 1e6:.0f} MB", disable=not progress)
    fh.write(head)
    written, room, sales = len(head), size - len(foot), 0
    pending: str | None = None
    try:
        while True:
            batch, batch_len = [], 0
            for _ in range(BATCH):
                rec = pending if pending is not None else next(records)
                pending = None
                if written + batch_len + len(rec) > room:  # ASCII only: characters == bytes
                    pending = rec
                    break
                batch.append(rec)
                batch_len += len(rec)
                sales += rec.startswith("  <V")
            if batch:
                fh.write("".join(batch).encode("ascii"))
                written += batch_len
                bar.update(batch_len)
            if pending is not None:
                break
        pad = room - written  # under one record's length: spaces, ending the line
        fh.write((b" " * (pad - 1) + b"\n" if pad else b"") + foot)
        bar.update(pad + len(foot))
    finally:
        bar.close()
    return sales


def cache_path(size: int, seed: int = 0, dealer_every: int = 0) -> Path:
    """The cache file name for these parameters (it need not exist yet)."""
    extra = f"-dealers{dealer_every}" if dealer_every else ""
    return data_dir() / f"vehicle-sales-{size}B-seed{seed}{extra}-v{FORMAT_VERSION}.xml"


def vehicle_sales(size: str | int | float = "40MB", seed: int = 0, *, dealer_every: int = 0,
                  progress: bool | None = None, cache: bool = True, out: str | Path | None = None) -> Path:
    """A synthetic VehicleSales XML file of exactly ``size`` (``"40MB"`` or bytes); its path.

    Reuses the cached file for the same ``(size, seed, dealer_every)`` when
    ``cache`` is true; ``out`` then gets a copy. With ``cache=False`` the file
    is written straight to ``out``. ``progress=None`` shows a progress bar
    from 64 MB on.
    """
    nbytes = parse_size(size)
    show = nbytes >= PROGRESS_FROM if progress is None else progress
    if not cache:
        if out is None:
            raise ValueError("cache=False needs out=PATH")
        return _write_atomically(Path(out), nbytes, seed, dealer_every, show)
    path = cache_path(nbytes, seed, dealer_every)
    if not (path.is_file() and path.stat().st_size == nbytes):
        _write_atomically(path, nbytes, seed, dealer_every, show)
    if out is None:
        return path
    target = Path(out)
    if target.resolve() != path.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # a copy, not a hard link: editing it must not change the cache
    return target


def _write_atomically(path: Path, nbytes: int, seed: int, dealer_every: int, progress: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb", buffering=1 << 20) as fh:
            write_vehicle_sales(fh, nbytes, seed, dealer_every=dealer_every, progress=progress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def main(argv: list[str]) -> int:
    """``labkit data vehicle-sales --size 200MB [--seed N] [--out PATH] [--no-cache] [--quiet]``."""
    parser = argparse.ArgumentParser(prog="labkit data", description="generate lesson data")
    sub = parser.add_subparsers(dest="kind", required=True)
    p = sub.add_parser("vehicle-sales", help="synthetic VehicleSales XML (lesson 01)")
    p.add_argument("--size", default="40MB", help="e.g. 44MB, 500kB, 2GiB (default 40MB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dealer-every", type=int, default=0, help="add a <Dealer> record after every N sales")
    p.add_argument("--out", help="where to put the file (default: the cache, whose path is printed)")
    p.add_argument("--no-cache", action="store_true", help="write straight to --out, bypassing the cache")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("where", help="print the cache directory")
    args = parser.parse_args(argv)
    if args.kind == "where":
        print(data_dir())
        return 0
    try:
        nbytes = parse_size(args.size)
        if args.no_cache and not args.out:
            parser.error("--no-cache needs --out")
        t0 = time.monotonic()
        path = vehicle_sales(nbytes, args.seed, dealer_every=args.dealer_every,
                             progress=not args.quiet, cache=not args.no_cache, out=args.out)
    except ValueError as exc:
        print(f"labkit data: {exc}", file=sys.stderr)
        return 2
    print(f"{path} ({path.stat().st_size} bytes, {time.monotonic() - t0:.1f} s)")
    return 0
