"""The collectives of ``bnpass inspect``'s run, one entry each, with the transport each travels by
(the record's collective sequence, bnpass/schedule.py ``collective_sequence`` and
bnpass/transport): for the JSON (``collective_entries``) and the text (``collectives_lines``)."""

from __future__ import annotations

__all__ = ["collective_entries", "transport_counts", "collectives_lines"]

_DIRECTIONS = ("forward", "backward")
# bnpass inspect runs on torch's fake process group: nothing to map a shared segment with.
_FAKE_NOTE = ("the fake process group has no shared memory: on real ranks of one host, transport=\"auto\" "
              "sends float32/float64 CPU statistics through shared memory (shm)")


def collective_entries(data: dict) -> list[dict]:
    """Every collective of every compiled graph, in issue order per graph and direction; ``sites``
    are indices of the inspection's site list (not the graph's own)."""
    out = []
    for graph in data["graphs"]:
        for direction in _DIRECTIONS:
            for position, c in enumerate(graph.get("sequence", {}).get(direction, [])):
                out.append({
                    "graph": graph["index"], "direction": direction, "position": position,
                    "op": c["op"], "numel": c["numel"], "dtype": c["dtype"], "group": c["group"],
                    "transport": c["transport"],
                    "sites": [graph["site_offset"] + s for s in c["sites"]],
                })
    return out


def transport_counts(entries: list[dict]) -> dict:
    """{direction: {transport: number of collectives}}."""
    counts = {d: {} for d in _DIRECTIONS}
    for e in entries:
        counts[e["direction"]][e["transport"]] = counts[e["direction"]].get(e["transport"], 0) + 1
    return counts


def collectives_lines(data: dict) -> list[str]:
    """A blank line, a line of transport counts, then a table of the collectives (indented: the sites
    table is the only one whose rows start at column 0)."""
    entries = collective_entries(data)
    if not entries:
        return []
    counts = transport_counts(entries)
    lines = ["", "transport: " + ", ".join(
        f"{d} " + " + ".join(f"{n} {t}" for t, n in sorted(counts[d].items())) for d in _DIRECTIONS if counts[d])]
    if all(e["transport"] != "shm" for e in entries):
        lines[1] += f" ({_FAKE_NOTE})"
    rows = [["#", "graph", "direction", "collective", "elements", "dtype", "group", "transport", "sites"]]
    rows += [[str(e["position"]), str(e["graph"]), e["direction"], f"all_reduce({e['op']})",
              "-" if e["numel"] is None else str(e["numel"]), str(e["dtype"]), str(e["group"]),
              e["transport"], ",".join(map(str, e["sites"])) or "-"] for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 1, 4}
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return lines
