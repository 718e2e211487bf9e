"""The dashboard on a fixed, made-up coordinator: to look at it without running nodes,
and to regenerate docs/dashboard.svg.

    python -m tui.demo                                # interactive, on the sample data
    python -m tui.demo --screenshot docs/dashboard.svg  # the session screen, 120x40
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tui.app import DashboardApp
from tui.fake import NOW, SESSION, TZ, FakeSource, sample_link, until


def app(session: bool = True) -> DashboardApp:
    return DashboardApp(
        FakeSource(sample_link()), session_id=SESSION if session else None, clock=lambda: NOW, tz=TZ
    )


async def screenshot(path: Path, size: tuple[int, int] = (120, 40)) -> None:
    dash = app()
    async with dash.run_test(size=size) as pilot:
        await until(pilot, lambda: dash.conn.snapshots >= 1)
        await pilot.pause()
        svg = dash.export_screenshot(title="fedctl dashboard")
    path.write_text(svg, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenshot", type=Path, help="write the session screen as SVG")
    parser.add_argument("--sessions", action="store_true", help="start on the sessions list")
    args = parser.parse_args()
    if args.screenshot:
        asyncio.run(screenshot(args.screenshot))
    else:
        app(session=not args.sessions).run()


if __name__ == "__main__":
    main()
