"""Shard results merged into one report: rates, latencies, the exact loss count, a table, JSON.

Rates are measured from the moment every shard had connected (the latest
start): acknowledged sends per second up to the last reply, received
deliveries per second up to the last delivery (deliveries still in flight
when the senders stop are drained and counted). `ratio` is the broker's
deliveries per second over the echo server's messages per second in the
same run.

`lost` counts acknowledged sends that at least one intended recipient never
received, after every recipient drained its mailbox: for each sender, the
messages it got a reply for (minus those whose reply said a recipient's
mailbox was full) are checked against each recipient's bitmap of what it
received from that sender.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from broker.loadtest.runner import ShardResult
from broker.loadtest.stats import Histogram
from broker.loadtest.topology import Topology, dm_mask


class PhaseTotals(msgspec.Struct, kw_only=True):
    """One phase (broker or echo), all shards added up."""

    connections: int = 0
    sends: int = 0
    sends_acked: int = 0
    deliveries: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    foreign: int = 0
    errors: dict[str, int] = msgspec.field(default_factory=dict)
    reply: Histogram = msgspec.field(default_factory=Histogram)
    deliver: Histogram = msgspec.field(default_factory=Histogram)
    lateness: Histogram = msgspec.field(default_factory=Histogram)
    send_seconds: float = 0.0
    deliver_seconds: float = 0.0
    drain_seconds: float = 0.0
    generator_cpu_seconds: float = 0.0

    @property
    def sends_per_s(self) -> float:
        return self.sends_acked / self.send_seconds if self.send_seconds > 0 else 0.0

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.deliver_seconds if self.deliver_seconds > 0 else 0.0


def merge(results: list[ShardResult]) -> PhaseTotals:
    totals = PhaseTotals()
    if not results:
        return totals
    started = max(r.started for r in results)
    for r in results:
        totals.connections += r.connections
        totals.sends += r.sends
        totals.sends_acked += r.sends_acked
        totals.deliveries += r.deliveries
        totals.duplicates += r.duplicates
        totals.out_of_order += r.out_of_order
        totals.foreign += r.foreign
        for code, count in r.errors.items():
            totals.errors[code] = totals.errors.get(code, 0) + count
        totals.reply.merge(r.reply)
        totals.deliver.merge(r.deliver)
        totals.lateness.merge(r.lateness)
        totals.generator_cpu_seconds += r.cpu_seconds
    # A phase with no reply (or no delivery) at all has no span.
    totals.send_seconds = max(max(r.last_reply for r in results) - started, 0.0)
    totals.deliver_seconds = max(max(r.last_delivery for r in results) - started, 0.0)
    totals.drain_seconds = max(r.drained for r in results) - max(r.send_stopped for r in results)
    return totals


class Loss(msgspec.Struct, kw_only=True):
    lost: int = 0
    expected_deliveries: int = 0
    mailbox_full: int = 0
    unacked_delivered: int = 0


def count_loss(topology: Topology, results: list[ShardResult], *,
               recipients: Callable[[int, bool], Iterable[int]] | None = None) -> Loss:
    """Acknowledged sends that some intended recipient never received (see the module doc).

    `recipients(sender, dm)` names who must receive; by default the
    topology's (a peer run's receivers are only the agents that do not send).
    """
    recipients = recipients or topology.recipients
    share = topology.spec.dm_share
    acked: dict[int, int] = {}
    counts: dict[int, int] = {}
    received: dict[tuple[int, int], int] = {}
    excused: dict[tuple[int, int], int] = {}
    names = {agent.name: i for i, agent in enumerate(topology.agents)}
    loss = Loss()
    for r in results:
        for sender, bits in r.acked.items():
            acked[sender] = acked.get(sender, 0) | int.from_bytes(bits, "little")
        for sender, count in r.sent_count.items():
            counts[sender] = max(counts.get(sender, 0), count)
        for recipient, by_sender in r.received.items():
            for sender, bits in by_sender.items():
                key = (recipient, sender)
                received[key] = received.get(key, 0) | int.from_bytes(bits, "little")
        for sender, n, name in r.mailbox_full:
            key = (names.get(name, -1), sender)
            excused[key] = excused.get(key, 0) | 1 << n
            loss.mailbox_full += 1
    for sender, acked_bits in acked.items():
        dms = dm_mask(counts.get(sender, 0), share) & acked_bits
        channel_messages = acked_bits & ~dms
        missing = 0
        for kind_bits, dm in ((channel_messages, False), (dms, True)):
            if not kind_bits:
                continue
            for recipient in recipients(sender, dm):
                key = (recipient, sender)
                wanted = kind_bits & ~excused.get(key, 0)
                loss.expected_deliveries += wanted.bit_count()
                missing |= wanted & ~received.get(key, 0)
        loss.lost += missing.bit_count()
    for (_, sender), got in received.items():
        loss.unacked_delivered += (got & ~acked.get(sender, 0)).bit_count()
    return loss


def build_report(topology: Topology, broker: list[ShardResult], echo: list[ShardResult],
                 extra: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run, as `--json` writes them."""
    b, e = merge(broker), merge(echo)
    loss = count_loss(topology, broker)
    echo_per_s = e.sends_per_s
    reply, deliver, echo_reply = b.reply.summary(), b.deliver.summary(), e.reply.summary()
    report: dict[str, Any] = {
        "sends_per_s": round(b.sends_per_s, 1),
        "deliveries_per_s": round(b.deliveries_per_s, 1),
        "echo_per_s": round(echo_per_s, 1),
        "ratio": round(b.deliveries_per_s / echo_per_s, 3) if echo_per_s else None,
        "send_reply_p50_ms": round(reply["p50"], 3),
        "send_reply_p90_ms": round(reply["p90"], 3),
        "send_reply_p99_ms": round(reply["p99"], 3),
        "send_reply_max_ms": round(reply["max"], 3),
        "send_deliver_p50_ms": round(deliver["p50"], 3),
        "send_deliver_p90_ms": round(deliver["p90"], 3),
        "send_deliver_p99_ms": round(deliver["p99"], 3),
        "send_deliver_max_ms": round(deliver["max"], 3),
        "generator_late_p99_ms": round(b.lateness.percentile_ms(99), 3),
        "echo_p50_ms": round(echo_reply["p50"], 3),
        "echo_p99_ms": round(echo_reply["p99"], 3),
        "lost": loss.lost,
        "errors": sum(b.errors.values()) + sum(e.errors.values()),
        "error_codes": {**{f"echo_{k}": v for k, v in e.errors.items()}, **b.errors},
        "sends": b.sends,
        "sends_acked": b.sends_acked,
        "deliveries": b.deliveries,
        "expected_deliveries": loss.expected_deliveries,
        "duplicates": b.duplicates,
        "out_of_order": b.out_of_order,
        "mailbox_full": loss.mailbox_full,
        "unacked_delivered": loss.unacked_delivered,
        "echo_messages": e.sends_acked,
        "send_seconds": round(b.send_seconds, 3),
        "deliver_seconds": round(b.deliver_seconds, 3),
        "drain_seconds": round(b.drain_seconds, 3),
        "echo_seconds": round(e.send_seconds, 3),
        "connections": b.connections,
        "generator_cpu_seconds": round(b.generator_cpu_seconds, 2),
        "generator_cpu_ms_per_send": (round(1000 * b.generator_cpu_seconds / b.sends_acked, 3)
                                      if b.sends_acked else None),
        "spec": msgspec.to_builtins(topology.spec),
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    report.update(extra)
    return report


def format_table(report: dict[str, Any]) -> str:
    """The end-of-run summary, one figure per line."""
    spec = report["spec"]
    rows = [
        ("scenario", f"{spec['agents']} agents, channels of {spec['channel_size']}, "
                     f"{spec['senders']} senders x {spec['window']} in flight, "
                     f"dm share {spec['dm_share']:g}"
                     + (f", open loop {spec['rate']:g}/s" if spec.get("rate") else "")
                     + (", over TLS" if report.get("tls") else "")),
        ("sends acked", f"{report['sends_acked']} of {report['sends']} "
                        f"in {report['send_seconds']:.2f} s"),
        ("sends/s", f"{report['sends_per_s']:,.0f}"),
        ("deliveries/s", f"{report['deliveries_per_s']:,.0f} "
                         f"({report['deliveries']} of {report['expected_deliveries']} expected)"),
        ("echo msgs/s", f"{report['echo_per_s']:,.0f} (transport ceiling, same clients)"),
        ("ratio", "n/a" if report["ratio"] is None
         else f"{report['ratio']:.2f} (broker deliveries/s over echo/s)"),
        ("send->reply ms", _latencies(report, "send_reply")),
        ("send->deliver ms", _latencies(report, "send_deliver")),
        ("echo ms", f"p50 {report['echo_p50_ms']:.2f}  p99 {report['echo_p99_ms']:.2f}"),
        *([("late sends ms", f"p99 {report['generator_late_p99_ms']:.2f} (open loop: the "
            "generator behind its schedule; counted in the latencies)")]
          if spec.get("rate") else []),
        ("lost", str(report["lost"])),
        ("errors", f"{report['errors']} {report['error_codes'] or ''}".strip()),
        ("duplicates", f"{report['duplicates']} (out of order: {report['out_of_order']})"),
    ]
    if "commits" in report:
        rows.append(("writer", f"{report['commits']} commits, mean batch {report['batch_mean']}, "
                               f"commit mean {report['commit_mean_ms']:.2f} ms, p99 <= "
                               f"{report['commit_p99_ms_at_most']} ms"))
        stages = [f"{stage} {report[f'{stage}_mean_ms']:.2f} / <= "
                  f"{report[f'{stage}_p99_ms_at_most']}"
                  for stage in ("queue", "apply", "sync") if f"{stage}_mean_ms" in report]
        if stages:
            rows.append(("writer ms", "mean / p99: " + ", ".join(stages)))
        if all(key in report for key in ("apply_cpu_mean_ms", "sync_cpu_mean_ms",
                                         "handover_mean_ms")):
            rows.append(("writer cpu ms", f"mean per batch: apply {report['apply_cpu_mean_ms']:.2f}"
                                          f" of {report['apply_mean_ms']:.2f}, sync "
                                          f"{report['sync_cpu_mean_ms']:.2f} of "
                                          f"{report['sync_mean_ms']:.2f} (the rest waiting for "
                                          "the GIL, a core or the disk); hand-over to the "
                                          f"thread and back {report['handover_mean_ms']:.2f}"))
    if "daemon_send_mean_ms" in report:
        rows.append(("daemon send ms", f"mean {report['daemon_send_mean_ms']:.2f}, p99 <= "
                                       f"{report['daemon_send_p99_ms_at_most']} (frame read "
                                       "to reply queued, in the daemon)"))
    if "gc_pauses" in report:
        longest = report["gc_pause_longest_ms_at_most"]
        rows.append(("daemon gc", f"{report['gc_pauses']} pauses, "
                                  f"{report['gc_pause_total_ms']:.1f} ms in all, longest "
                                  + ("over the last bucket" if longest is None
                                     else f"<= {longest} ms")))
    if "daemon_cpu_percent" in report:
        per_send = report.get("daemon_cpu_ms_per_send")
        rows.append(("daemon cpu", f"{report['daemon_cpu_percent']:.0f}% of one core, "
                                   + (f"{per_send:.2f} ms per send, " if per_send else "")
                                   + f"RSS {report['daemon_rss_mib']:.0f} MiB"))
    per_send = report.get("generator_cpu_ms_per_send")
    rows.append(("generator cpu", f"{report['generator_cpu_seconds']:.1f} s over "
                                  f"{report['send_seconds']:.1f} s"
                                  + (f", {per_send:.2f} ms per send" if per_send else "")))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def format_curve(report: dict[str, Any]) -> str:
    """A latency curve: the maximum's table, then one line per fraction of it."""
    lines = [format_table(report), "", "  latency at fractions of the maximum "
             f"({report['sends_per_s']:,.0f} sends/s, closed loop above):"]
    for point in report["points"]:
        head = f"  {point['fraction']:>5g} x max  {point['rate']:>8,.1f}/s asked, "
        if "failed" in point:
            lines.append(f"{head}failed: {point['failed']}")
            continue
        lines.append(
            f"{head}{point['sends_per_s']:>8,.1f}/s acked  send->reply p50 "
            f"{point['send_reply_p50_ms']:.2f}  p99 {point['send_reply_p99_ms']:.2f}  "
            f"send->deliver p99 {point['send_deliver_p99_ms']:.2f}  late p99 "
            f"{point['generator_late_p99_ms']:.2f} ms  lost {point['lost']}  "
            f"errors {point['errors']}")
    lines.append(f"  all phases: lost {report['lost_all_phases']}, errors "
                 f"{report['errors_all_phases']}, failed points {report['failed_points']}")
    return "\n".join(lines)


def _latencies(report: dict[str, Any], key: str) -> str:
    return "  ".join(f"{p} {report[f'{key}_{p}_ms']:.2f}" for p in ("p50", "p90", "p99", "max"))
