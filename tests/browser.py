"""Headless Chromium (Debian's ``chromium`` package) for tests that look at an HTML page as a reader would.

`inspect_page` loads a copy of the page with a measuring script appended, lets Chromium run it (decoding
images and audio), and returns what the script measured; `screenshot` writes a PNG of the page.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Measured after load: every image's decoded size, every audio element's duration once its metadata is in,
# and each pair of visible text boxes that overlap (text nodes' client rects, more than 2 px each way).
_MEASURE = """<script>
window.addEventListener("load", async () => {
  const audios = [...document.querySelectorAll("audio")];
  await Promise.all(audios.map(a => a.readyState >= 1 ? null : new Promise(done => {
    a.addEventListener("loadedmetadata", done); a.addEventListener("error", done); a.load(); })));
  const boxes = [];
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    if (!n.textContent.trim() || n.parentElement.closest("script") || !n.parentElement.checkVisibility()) continue;
    const range = document.createRange(); range.selectNodeContents(n);
    for (const r of range.getClientRects()) if (r.width > 0 && r.height > 0)
      boxes.push({text: n.textContent.trim().slice(0, 40), l: r.left, r: r.right, t: r.top, b: r.bottom});
  }
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    if (Math.min(a.r, b.r) - Math.max(a.l, b.l) > 2 && Math.min(a.b, b.b) - Math.max(a.t, b.t) > 2)
      overlaps.push([a.text, b.text]);
  }
  const result = {
    images: [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight})),
    audio: audios.map(a => a.duration), texts: boxes.length, overlaps: overlaps,
    page_width: document.documentElement.scrollWidth, view_width: window.innerWidth};
  const out = document.createElement("pre"); out.id = "vgim-measure";
  out.textContent = JSON.stringify(result); document.body.appendChild(out);
});
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (scripts/setup.sh installs it with the dev extras)")
    return exe


def _run(args: list[str]) -> str:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
            "--autoplay-policy=no-user-gesture-required", "--window-size=1280,2000"]
    r = subprocess.run(base + args, capture_output=True, text=True, timeout=120)
    return r.stdout


def inspect_page(page: Path, tmp: Path) -> dict:
    """What `_MEASURE` found on ``page`` (a copy with the script is written under ``tmp``)."""
    probe = tmp / f"measure-{page.name}"
    probe.write_text(page.read_text().replace("</body>", _MEASURE + "</body>"))
    dom = _run(["--virtual-time-budget=20000", "--dump-dom", probe.resolve().as_uri()])
    m = re.search(r'<pre id="vgim-measure">(.*?)</pre>', dom, re.S)
    assert m, f"chromium did not run the measuring script on {page}: {dom[-500:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def screenshot(page: Path, png: Path, height: int = 2400) -> Path:
    _run([f"--window-size=1280,{height}", f"--screenshot={png.resolve()}", "--virtual-time-budget=10000",
          page.resolve().as_uri()])
    return png
