"""Bounds on what one request may cost, and which Host names the service answers to.

A request's work grows with its images' pixels and with the focal views cut from them (a 655-byte PNG of 32 x 16000
pixels gave 1,000 crops: 228 s of CPU). Each image is checked from its header before it is decoded: pixels, aspect
ratio and views per image (:func:`medbridge.data.focal.view_bounds_problem`), then the request's totals of pixels,
views and heat maps. Beyond a limit the answer is 413 (too much work) or 422 (a shape no model input has), naming it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .decode import UploadError, UploadLimits

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class RequestBudget:
    """What the images of one request have used so far against ``limits``; :meth:`charge` refuses the image that
    would go beyond (before it is decoded)."""

    limits: UploadLimits
    pixels: int = 0
    views: int = 0
    images: list = field(default_factory=list)

    def charge(self, name: str, pixels: int, views: int) -> None:
        self.pixels += pixels
        self.views += views
        self.images.append(views)
        if self.pixels > self.limits.max_request_pixels:
            raise UploadError(f"{name}: the request's images hold {self.pixels:,} pixels in all, above the limit of "
                              f"{self.limits.max_request_pixels:,} per request; send fewer images per request",
                              status=413)
        if self.views > self.limits.max_request_views:
            raise UploadError(f"{name}: the request's images give {self.views:,} views in all, above the limit of "
                              f"{self.limits.max_request_views:,} per request; send fewer images per request",
                              status=413)


def check_explain_count(explain: int | list[int] | None, n_images: int, n_labels: int,
                        limits: UploadLimits) -> None:
    """Heat maps cost a forward and backward pass each: at most ``limits.max_explain_maps`` per request."""
    if explain is None:
        return
    per_image = min(explain, n_labels) if isinstance(explain, int) else len(explain)
    if per_image * n_images > limits.max_explain_maps:
        raise UploadError(f"explain: {per_image} heat map(s) x {n_images} image(s) = {per_image * n_images} maps, "
                          f"above the limit of {limits.max_explain_maps} per request; ask for fewer labels "
                          "(e.g. explain=top1) or send fewer images", status=413)


def allowed_hosts(host: str, token: str | None) -> tuple[str, ...] | None:
    """The Host header names a server bound to ``host`` answers: without a token, only loopback names and the bound
    address (a web page elsewhere cannot reach it through DNS rebinding); with a token, any (None): the token is
    what a rebinding page cannot send."""
    if token:
        return None
    return tuple(dict.fromkeys((*LOOPBACK_NAMES, host.strip("[]").lower())))


def host_name(header: str) -> str:
    """The name of a Host header without its port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    name, _, port = header.rpartition(":")
    if name and port.isdigit():
        try:  # a bare IPv6 address has colons of its own
            ipaddress.IPv6Address(header)
            return header
        except ValueError:
            return name
    return header


def host_allowed(header: str | None, allowed: tuple[str, ...] | None) -> bool:
    return allowed is None or (header is not None and host_name(header) in allowed)
