"""Keyframe-aware exact decoding: demux once, decode only from the keyframe before each wanted frame.

Raises `NotExact` whenever it cannot show that its frames and frame count are the sequential
decode's; the caller then decodes sequentially (the rule: docs/extraction.md, "Decoding").
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

MAX_PACKET_BYTES = 256 << 20  # compressed bytes held in memory; larger videos decode sequentially
# An MPEG-4 Part 2 packet this small can be a not-coded VOP (a DivX drop frame or the placeholder of
# packed B-frames): the decoder outputs no frame for it, so packets would overcount frames.
MPEG4_MIN_PACKET = 16


class NotExact(Exception):
    """The seek path cannot prove exactness for this video; `str(error)` says why."""


@dataclass
class PacketIndex:
    """A video stream's packets in decode order, their pts in display order, and its keyframes."""

    packets: list[Any]
    display_pts: list[int]  # sorted: display index -> pts
    key_positions: list[int]  # decode positions of keyframes (ascending)
    key_pts: list[int]  # their pts, ascending as well (checked)

    @property
    def n_frames(self) -> int:
        return len(self.packets)


def index_packets(container: Any, stream: Any, declared_exact: int) -> PacketIndex:
    """Demux every packet of `stream` (nothing decoded) and check what the seek path relies on.

    `declared_exact`: the container's own frame count (`stream.frames`), 0 if it has none.
    """
    import av

    packets: list[Any] = []
    size = 0
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's final flush packet
                continue
            if packet.pts is None:
                raise NotExact("a packet without pts")
            if packet.is_corrupt:
                raise NotExact("a packet flagged corrupt")
            size += packet.size
            if size > MAX_PACKET_BYTES:
                raise NotExact("compressed video too large to hold")
            packets.append(packet)
    except av.error.FFmpegError as error:
        raise NotExact(f"demux error: {error}") from None
    if not packets:
        raise NotExact("no packets")
    if stream.codec_context.name == "mpeg4":
        if any(p.size < MPEG4_MIN_PACKET for p in packets):
            raise NotExact("MPEG-4 packets that may be not-coded frames")
        if b"DivX" in bytes(packets[0]):
            raise NotExact("DivX MPEG-4 (may pack B-frames)")
    pts = [int(p.pts) for p in packets]
    display = sorted(pts)
    if len(set(display)) != len(display):
        raise NotExact("repeated pts")
    if declared_exact and declared_exact != len(packets):
        raise NotExact(f"{len(packets)} packets, {declared_exact} frames declared")
    keys = [i for i, p in enumerate(packets) if p.is_keyframe]
    if not keys or keys[0] != 0 or pts[0] != display[0]:
        raise NotExact("the first packet is not a keyframe showing the first frame")
    key_pts = [pts[i] for i in keys]
    if any(b <= a for a, b in zip(key_pts, key_pts[1:], strict=False)):
        raise NotExact("keyframe pts not increasing in decode order")
    return PacketIndex(packets, display, keys, key_pts)


def decode_frames(codec_context: Any, index: PacketIndex, wanted: list[int]) -> tuple[dict, int]:
    """The frames at display indices `wanted`: {index: av.VideoFrame}, and how many frames decoded.

    For each wanted frame (ascending), decoding jumps (flush, then feed from a keyframe) only when
    the last keyframe at or before it lies beyond the next packet to feed; otherwise it goes on.
    After a jump, frames showing before the keyframe (open-GOP leading pictures) are dropped; every
    other frame must come out in display order with no frame missing, else `NotExact`.
    """
    import av

    display_of = {pts: i for i, pts in enumerate(index.display_pts)}
    wanted_set = set(wanted)
    out: dict[int, Any] = {}
    pos, next_display, floor_pts, decoded = 0, -1, 0, 0
    drained = False
    for target in sorted(wanted_set):
        if target in out:
            continue
        k = bisect_right(index.key_pts, index.display_pts[target]) - 1
        if next_display < 0 or index.key_positions[k] > pos:
            codec_context.flush_buffers()
            pos, floor_pts = index.key_positions[k], index.key_pts[k]
            next_display, drained = display_of[floor_pts], False
        while target not in out:
            if pos < len(index.packets):
                packet, pos = index.packets[pos], pos + 1
            elif not drained:
                packet, drained = None, True
            else:
                raise NotExact(f"frame {target} never came out of the decoder")
            try:
                frames = codec_context.decode(packet)
            except av.error.FFmpegError as error:
                raise NotExact(f"decode error: {error}") from None
            for frame in frames:
                decoded += 1
                if frame.pts is None:
                    raise NotExact("a decoded frame without pts")
                if frame.pts < floor_pts:
                    continue
                if display_of.get(int(frame.pts)) != next_display:
                    raise NotExact(f"frame {next_display} did not come out next")
                if next_display in wanted_set:
                    out[next_display] = frame
                next_display += 1
    return out, decoded
