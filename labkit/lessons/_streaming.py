"""What lesson 01 runs in a fresh interpreter: the XML loaders and the two downloads.

Kept apart from :mod:`labkit.lessons.memory` (which declares Celery tasks) so
that the fresh process measuring a loader imports only this module, the XML
libraries and ``requests``: its baseline is then an interpreter with those,
not one with Celery and redis-py loaded as well, and it starts faster.
:mod:`labkit.lessons.memory` re-exports everything here.

Every loader counts the ``<VehicleSale>`` records and sums their
``CashPrice``, so they all do the same work and differ only in how they load.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

RECORD = "VehicleSale"  # labkit.data.RECORD_TAG
FIELD = "CashPrice"


def load_parse(path: str | Path) -> dict[str, float]:
    """Before: build the whole tree, then walk it."""
    root = ET.parse(path).getroot()
    records, total = 0, 0.0
    for sale in root.iter(RECORD):
        records += 1
        total += float(sale.findtext(FIELD))
    return {"records": records, "total": round(total, 2)}


def load_iterparse_no_clear(path: str | Path) -> dict[str, float]:
    """Before, in disguise: ``iterparse`` without clearing still keeps every element."""
    records, total = 0, 0.0
    for _event, elem in ET.iterparse(path):  # "end" events
        if elem.tag == RECORD:
            records += 1
            total += float(elem.findtext(FIELD))
    return {"records": records, "total": round(total, 2)}


def load_talk(xml_path: str | Path) -> dict[str, float]:
    """The 2014 slide's loop, run as written. Every line that differs, and why:

    1. ``etree.cElementTree.iterparse`` -> ``ET.iterparse``: ``xml.etree.cElementTree``
       was removed in Python 3.9; ``xml.etree.ElementTree`` has used the same C
       parser automatically since Python 3.3.
    2. ``self._write_to_db(data_type, item_data)`` -> ``_write_to_db(item_data)``:
       there is no database (nor ``self``) here; like every loader in this
       lesson it counts the record and adds up its ``CashPrice``.
    3. The transcript lost the slide's indentation. ``level -= 1`` and
       ``elem.clear()`` are read as the body of ``if event == 'end':``
       (clearing at a ``start`` event would empty an element the parser has
       not finished).
    """
    records, total = 0, 0.0

    def _write_to_db(item_data: dict[str, str]) -> None:  # 2.
        nonlocal records, total
        records += 1
        total += float(item_data[FIELD])

    events = ('start', 'end')
    etree = ET.iterparse(xml_path, events=events)  # 1.
    level = -1
    item_data = {}
    for event, elem in etree:
        name = elem.tag
        if event == 'start':
            level += 1
        if level == 2 and event == 'end' and elem.text:
            item_data[name] = elem.text
        if level == 1 and event == 'end':
            _write_to_db(item_data)  # 2.
            item_data = {}
        if event == 'end':  # 3.
            level -= 1
            elem.clear()
    return {"records": records, "total": round(total, 2)}


def load_iterparse_clear(path: str | Path) -> dict[str, float]:
    """After (stdlib): take the root from the first "start" event; empty it after each record."""
    records, total = 0, 0.0
    events = ET.iterparse(path, events=("start", "end"))
    _event, root = next(events)
    for event, elem in events:
        if event == "end" and elem.tag == RECORD:
            records += 1
            total += float(elem.findtext(FIELD))
            root.clear()  # drops this record (and any earlier one) from the tree
    return {"records": records, "total": round(total, 2)}


def load_lxml(path: str | Path) -> dict[str, float]:
    """After (lxml): events for ``<VehicleSale>`` only; clear it and delete the handled siblings."""
    from lxml import etree  # noqa: PLC0415 - workers need not import lxml unless they use it

    records, total = 0, 0.0
    for _event, elem in etree.iterparse(str(path), tag=RECORD):
        records += 1
        total += float(elem.findtext(FIELD))
        elem.clear(keep_tail=True)
        while elem.getprevious() is not None:
            del elem.getparent()[0]
    return {"records": records, "total": round(total, 2)}


LOADERS = {
    "parse": load_parse,
    "iterparse": load_iterparse_no_clear,
    "talk": load_talk,
    "clear": load_iterparse_clear,
    "lxml": load_lxml,
}


def download_content(url: str) -> dict[str, int]:
    """Before: ``r.content`` holds the whole body in memory (and briefly its pieces too)."""
    import requests  # noqa: PLC0415

    r = requests.get(url, timeout=60)
    r.raise_for_status()
    body = r.content
    return {"bytes": len(body), "crc32": zlib.crc32(body)}


def download_stream(url: str, chunk_size: int = 1 << 16) -> dict[str, int]:
    """After: ``stream=True`` + ``iter_content``: one chunk at a time (write it to a file in real life)."""
    import requests  # noqa: PLC0415

    n, crc = 0, 0
    with requests.get(url, stream=True, timeout=60) as r:
        r.raise_for_status()
        for chunk in r.iter_content(chunk_size=chunk_size):
            n += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return {"bytes": n, "crc32": crc}
