"""Read every page of the built book in headless Chromium; report what readers meet.

Usage (after `make book`; `make browser-check` installs Chromium and runs this)::

    python .ci/browser_check.py [_build/html] [--pages book/03_attention.html ...]

The site is served on 127.0.0.1 and Chromium resolves no other host, as a reader
offline would see it. For every page, at 1366 px and at 390 px:

- links: every internal link, anchor, image, script and stylesheet resolves;
- math: every formula is typeset by the local MathJax, no raw TeX is left in the prose;
- raw markup: no ``{glue``, ``{cite}``-style role, ``:::`` or fence text in the prose;
- lost text: every line of the page's markdown source is found in the rendered page
  (a line starting with ``%`` is a MyST comment, and a raw-text scan cannot see
  deleted text);
- overflow: nothing sticks out of the content column and the page never scrolls
  sideways; at 1366 px no code cell, output or table needs a horizontal scroll bar
  either (at 390 px those are counted but allowed);
- figures: every figure has a caption and alt text that is not a file path;
- requests: no request leaves 127.0.0.1;
- one top bar at most: the theme's empty header (a second search box) stays hidden.

The search page must list results for "attention". Full-page screenshots go to
``_build/screenshots/``. The exit status is 1 when any page has a defect.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import posixpath
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bs4 import BeautifulSoup

WIDTHS = (1366, 390)
#: The width at which code cells, outputs and tables must fit without a scroll bar.
DESKTOP = 1366
SEARCH_TERM = "attention"
#: Words in a row that must reappear in the page for a source line to count as shown.
NGRAM = 4
ARTICLE = "article.bd-article"
#: Prose is the article without code, outputs and math (those may hold braces and TeX).
NOT_PROSE = "pre, code, script, style, mjx-container, .math, .cell_output, .highlight"
RAW_MARKUP = re.compile(r"\{[a-z][\w:-]*\}`?|:::|```|\{\{|\}\}")
RAW_TEX = re.compile(r"\\[A-Za-z]{2,}|\\[()\[\]]|\$\$")
#: A fence whose body is not prose shown as text (code, math, raw blocks).
CODE_FENCE = re.compile(
    r"^(`{3,}|~{3,})\s*(\{(code-cell|code-block|code|math|glue[:\w]*|eval-rst|raw)\}"
    r"|(?!\{)\S*\s*$)"
)
FENCE = re.compile(r"^(`{3,}|~{3,}|:{3,})")
#: Inline markup whose rendered text differs from its source: n-grams break there.
INLINE_BREAKS = re.compile(
    r"!\[[^\]]*\]\([^)]*\)"  # image
    r"|\{[\w:-]+\}`[^`]*`"  # role, e.g. {cite:p}`key` or {glue:text}`name`
    r"|`[^`]*`"  # code span
    r"|\$\$.*?\$\$|\$[^$]+\$"  # math
    r"|\{\{.*?\}\}"  # substitution
    r"|<[^>]+>"  # HTML tag or autolink
    r"|\[\^[^\]]+\]"  # footnote reference
    r"|https?://\S+"
)
LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
BREAK = " \x00 "


@dataclass
class PageReport:
    """The defects of one page; ``notes`` are measurements that are not defects."""

    page: str
    defects: dict[str, list[str]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def add(self, category: str, message: str) -> None:
        self.defects.setdefault(category, []).append(message)

    @property
    def ok(self) -> bool:
        return not self.defects


# --- lost text: the markdown source against the rendered page


def words(text: str) -> list[str]:
    """Lower-case words and numbers; apostrophes, dashes and markup separate them."""
    return re.findall(r"[^\W_]+|\x00", text.lower())


def ngrams(tokens: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    return {
        gram
        for i in range(len(tokens) - n + 1)
        if "\x00" not in (gram := tuple(tokens[i : i + n]))
    }


def prose_lines(markdown: str) -> list[str]:
    """The lines of a MyST markdown text that a reader should see as prose.

    Code, math and raw fences, directive options, targets and front matter are left
    out; everything else, comments (``%``) included, is kept.
    """
    lines, in_code, fence = [], False, ""
    body = markdown.splitlines()
    if body and body[0].strip() == "---":  # front matter
        end = next((i for i, line in enumerate(body[1:], 1) if line == "---"), 0)
        body = body[end + 1 :]
    for line in body:
        stripped = line.strip()
        if in_code:
            if stripped.startswith(fence) and stripped.strip(fence[0]) == "":
                in_code = False
            continue
        if match := FENCE.match(stripped):
            if CODE_FENCE.match(stripped):
                in_code, fence = True, match.group(1)
            continue  # a fence line (directive or its end) is not prose
        if re.match(r"^:[\w-]+:", stripped) or re.match(r"^\(.+\)=$", stripped):
            continue  # directive option or target
        if stripped in {"---", "+++"} or stripped.startswith("<!--"):
            continue
        lines.append(line)
    return lines


def source_ngrams(line: str) -> set[tuple[str, ...]]:
    """The word n-grams of one markdown line, broken where markup renders otherwise."""
    text = re.sub(r"^\s*(#{1,6}\s|>\s?|[-*+]\s|\d+[.)]\s|:\s)", "", line)
    text = INLINE_BREAKS.sub(BREAK, text)
    text = LINK.sub(r"\1", text).replace("|", BREAK)
    return ngrams(words(text))


def lost_lines(markdown: str, rendered_text: str) -> list[str]:
    """Source lines none of whose word n-grams appears in the rendered text.

    A line with fewer than ``NGRAM`` words in a row between markup cannot be checked
    and is never reported.
    """
    shown = ngrams(words(rendered_text))
    return [
        line.strip()
        for line in prose_lines(markdown)
        if (grams := source_ngrams(line)) and not grams & shown
    ]


def markdown_source(site: Path, page: str) -> str | None:
    """The markdown a page was rendered from (Sphinx copies it to ``_sources``)."""
    stem = posixpath.splitext(page)[0]
    # Jupyter Book copies sources as they are; plain Sphinx appends .txt
    names = [
        stem + suffix + txt for suffix in (".ipynb", ".md") for txt in ("", ".txt")
    ]
    paths = [site / "_sources" / name for name in names]
    path = next((path for path in paths if path.is_file()), None)
    if path is None:
        return None
    if ".ipynb" not in path.name:
        return path.read_text(encoding="utf-8")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n\n".join(
        "".join(cell["source"])
        for cell in cells
        if cell["cell_type"] == "markdown"
        and "remove-cell" not in cell.get("metadata", {}).get("tags", [])
    )


# --- checks on the HTML as built


def article_of(soup: BeautifulSoup):
    return soup.select_one(ARTICLE) or soup.body


def prose_text(article) -> str:
    """The article's text without code, outputs and math, as in the static HTML."""
    article = BeautifulSoup(str(article), "html.parser")
    for element in article.select(NOT_PROSE):
        element.decompose()
    return article.get_text(" ")


@functools.cache
def ids_of(path: Path) -> frozenset[str]:
    soup = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    return frozenset(
        tag.get("id") or tag.get("name") for tag in soup.select("[id], a[name]")
    )


def check_references(site: Path, page: str, soup: BeautifulSoup, report: PageReport):
    """Internal links (with their anchors), images, scripts and stylesheets."""
    references = [(tag, "href") for tag in soup.select("a[href], link[href]")]
    references += [(tag, "src") for tag in soup.select("img[src], script[src]")]
    count = 0
    for tag, attribute in references:
        target = tag[attribute]
        parts = urlsplit(target)
        if parts.scheme or target.startswith("//"):
            continue
        count += 1
        relative = posixpath.join(posixpath.dirname(page), unquote(parts.path))
        path = site / posixpath.normpath(relative) if parts.path else site / page
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            report.add("links", f"{tag.name} {attribute}={target!r}: no such file")
        elif parts.fragment and path.suffix == ".html":
            if unquote(parts.fragment) not in ids_of(path):
                report.add(
                    "links", f"{tag.name} {attribute}={target!r}: no such anchor"
                )
    report.notes["links"] = f"{count} internal references"


def is_path_like(alt: str) -> bool:
    """Empty, a file name, or one word with a slash: not a description.

    A sentence may hold a slash ("H/32 by W/32"); a path has no spaces.
    """
    alt = alt.strip()
    if not alt or re.search(r"\.(png|svg|jpe?g|gif)$", alt, re.I):
        return True
    return " " not in alt and bool(re.search(r"[/\\]", alt))


def check_figures(article, report: PageReport) -> tuple[int, int]:
    """Every image in the article is a numbered figure with a caption and alt text."""
    images = article.select("img:not(.toggler)")  # togglers: the index's +/- icons
    captioned = 0
    for index, image in enumerate(images, 1):
        figure = image.find_parent("figure")
        caption = figure.find("figcaption") if figure else None
        caption_text = caption.get_text(" ", strip=True) if caption else ""
        alt = image.get("alt", "")
        name = posixpath.basename(image.get("src", ""))[:20]
        if caption_text:
            captioned += 1
        else:
            report.add("figures", f"figure {index} ({name}...) has no caption")
        if is_path_like(alt):
            report.add("figures", f"figure {index} ({name}...) alt text is {alt!r}")
    report.notes["figures"] = f"{len(images)} figures, {captioned} captioned"
    return len(images), captioned


def redirect_of(soup: BeautifulSoup) -> str | None:
    """The target of a page that only redirects (Jupyter Book's root index.html)."""
    meta = soup.find("meta", attrs={"http-equiv": re.compile("refresh", re.I)})
    if meta is None or soup.select_one(ARTICLE):
        return None
    return meta.get("content", "").partition("url=")[2].strip() or None


def check_static(site: Path, page: str) -> PageReport:
    """The checks that need only the built HTML and the page's source."""
    report = PageReport(page)
    soup = BeautifulSoup((site / page).read_text(encoding="utf-8"), "html.parser")
    if redirect := redirect_of(soup):
        target = site / posixpath.normpath(
            posixpath.join(posixpath.dirname(page), redirect)
        )
        if not target.is_file():
            report.add("links", f"redirects to {redirect!r}: no such file")
        report.notes["redirect"] = redirect
        return report
    check_references(site, page, soup, report)
    article = article_of(soup)
    for match in sorted(set(RAW_MARKUP.findall(prose_text(article)))):
        report.add("raw markup", f"{match!r} shown as text")
    source = markdown_source(site, page)
    if source is not None:
        lost = lost_lines(source, article.get_text(" "))
        for line in lost:
            report.add("lost text", f"source line not on the page: {line[:100]!r}")
        checked = sum(bool(source_ngrams(line)) for line in prose_lines(source))
        report.notes["source"] = f"{checked} markdown lines checked, {len(lost)} lost"
    check_figures(article, report)
    return report


# --- checks in the browser

#: Runs in the page once MathJax is done: overflow, math, raw TeX and the top bar.
PAGE_PROBE = """
const [notProse] = arguments;
const article = document.querySelector('article.bd-article') || document.body;
const column = article.getBoundingClientRect();
const visible = el => {
  const style = getComputedStyle(el);
  return style.display !== 'none' && style.visibility !== 'hidden'
    && el.getClientRects().length > 0;
};
const kind = el => {
  if (el.closest('.cell_input')) return 'code cell';
  if (el.closest('.cell_output')) return el.querySelector('table') ? 'output table'
    : 'output';
  if (el.closest('table')) return 'table';
  if (el.closest('mjx-container, .math')) return 'math';
  if (el.closest('pre')) return 'code block';
  if (el.closest('code')) return 'inline code';
  return el.tagName.toLowerCase();
};
const snippet = el => ((el.innerText || el.getAttribute('alt') || '')
  .split('\\n').find(line => line.trim()) || '').trim().slice(0, 70);
const scrolls = [], sticksOut = [];
const reported = [];
for (const el of article.querySelectorAll('*')) {
  if (reported.some(r => r.contains(el)) || !visible(el)) continue;
  // MathJax's glyph boxes clip on purpose; a formula counts as a whole
  const formula = el.closest('mjx-container');
  if (formula && formula !== el) continue;
  const style = getComputedStyle(el);
  const clips = ['auto', 'scroll', 'hidden'].includes(style.overflowX);
  // a formula's scrollWidth counts MathJax's invisible assistive MathML: measure
  // the typeset formula (mjx-math) instead
  const typeset = el.closest('.math') && el.querySelector('mjx-math');
  const width = typeset ? Math.ceil(typeset.getBoundingClientRect().width)
    : el.scrollWidth;
  if (clips && width > el.clientWidth + 1) {
    scrolls.push({kind: kind(el), text: snippet(el), width, room: el.clientWidth});
    reported.push(el);
    continue;
  }
  const box = el.getBoundingClientRect();
  let clipped = false;
  for (let p = el.parentElement; p && p !== article; p = p.parentElement) {
    if (getComputedStyle(p).overflowX !== 'visible') { clipped = true; break; }
  }
  if (!clipped && box.width > 0 && box.right > column.right + 1) {
    sticksOut.push({kind: kind(el), text: snippet(el),
                    width: Math.round(box.width), room: Math.round(column.width)});
    reported.push(el);
  }
}
const maths = [...article.querySelectorAll('.math')];
const untypeset = maths.filter(m => !m.querySelector('mjx-container'))
  .map(m => m.textContent.trim().slice(0, 70));
const errors = [...article.querySelectorAll('mjx-merror')]
  .map(m => m.textContent.trim().slice(0, 70));
const prose = article.cloneNode(true);
prose.querySelectorAll(notProse).forEach(el => el.remove());
const header = document.querySelector('#pst-header');
const cells = article.querySelectorAll('.cell_input').length;
return {
  scrolls, sticksOut, untypeset, errors, prose: prose.textContent, cells,
  maths: maths.length,
  pageWidth: document.documentElement.scrollWidth,
  viewport: document.documentElement.clientWidth,
  headerHeight: header && visible(header) ? header.getBoundingClientRect().height : 0,
  brokenImages: [...document.images].filter(i => i.complete && i.naturalWidth === 0)
    .map(i => i.getAttribute('src')),
};
"""

WAIT_FOR_MATH = """
const done = arguments[arguments.length - 1];
const fonts = () => document.fonts ? document.fonts.ready : Promise.resolve();
if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
  MathJax.startup.promise.then(fonts).then(() => done(true), () => done(false));
} else { fonts().then(() => done(false)); }
"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def serve(site: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        # offline: any host but the local server fails to resolve
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path="/usr/bin/chromedriver")
    )
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    driver.execute_cdp_cmd("Network.enable", {})
    return driver


def network_events(driver) -> tuple[list[str], list[str]]:
    """Requested URLs and failed local requests since the last call."""
    urls, failed, pending = [], [], {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if urlsplit(url).path == "/favicon.ico":
                continue  # Chromium asks for it on its own; the book has none
            urls.append(url)
            pending[params["requestId"]] = url
        elif method == "Network.responseReceived":
            status = params["response"]["status"]
            if status >= 400 and params["requestId"] in pending:
                failed.append(f"{params['response']['url']} (HTTP {status})")
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            url = pending.get(params["requestId"], "?")
            if urlsplit(url).hostname in {"127.0.0.1", None}:
                failed.append(f"{url} ({params.get('errorText')})")
    return urls, failed


#: JPEG holds at most 65,535 pixels a side: taller pages are shot in parts.
SHOT_HEIGHT = 32_000


def screenshot(driver, path: Path, width: int) -> list[Path]:
    """Full-page screenshot: ``path``, then ``<stem>-part2`` ... for a tall page."""
    import base64

    height = driver.execute_script(
        "return Math.max(document.documentElement.scrollHeight,"
        " document.body.scrollHeight)"
    )
    written = []
    for k, top in enumerate(range(0, height, SHOT_HEIGHT), start=1):
        clip = {"x": 0, "y": top, "width": width, "scale": 1}
        clip["height"] = min(SHOT_HEIGHT, height - top)
        shot = driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "jpeg",
                "quality": 70,
                "captureBeyondViewport": True,
                "clip": clip,
            },
        )
        part = path if k == 1 else path.with_name(f"{path.stem}-part{k}{path.suffix}")
        part.write_bytes(base64.b64decode(shot["data"]))
        written.append(part)
    return written


def check_in_browser(driver, base: str, report: PageReport, shots: Path) -> None:
    for width in WIDTHS:
        driver.set_window_size(width, 900)
        network_events(driver)  # drop what the last page left
        driver.get(f"{base}/{report.page}")
        typeset = driver.execute_async_script(WAIT_FOR_MATH)
        probe = driver.execute_script(PAGE_PROBE, NOT_PROSE)
        urls, failed = network_events(driver)
        tag = f"{width} px"
        external = sorted({u for u in urls if is_external(u)})
        for url in external:
            report.add("requests", f"{tag}: external request {url}")
        for item in failed:
            report.add("links", f"{tag}: failed to load {item}")
        for src in probe["brokenImages"]:
            report.add("links", f"{tag}: image {src} did not load")
        if width == DESKTOP:
            check_math(report, probe, typeset)
        if probe["pageWidth"] > probe["viewport"] + 1:
            report.add(
                "overflow",
                f"{tag}: the page scrolls sideways ({probe['pageWidth']} px wide)",
            )
        for item in probe["sticksOut"]:
            report.add("overflow", f"{tag}: {describe(item)} sticks out of the column")
        kinds: dict[str, int] = {}
        for item in probe["scrolls"]:
            kinds[item["kind"]] = kinds.get(item["kind"], 0) + 1
            if width == DESKTOP:
                report.add("overflow", f"{tag}: {describe(item)} is cut off (scrolls)")
        summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        report.notes[f"scroll {width}"] = summary
        report.notes["code cells"] = str(probe["cells"])
        if probe["headerHeight"] > 0:
            report.add(
                "top bar",
                f"{tag}: an extra {probe['headerHeight']:.0f} px top bar is shown",
            )
        name = report.page.replace("/", "_").removesuffix(".html")
        screenshot(driver, shots / f"{name}-{width}.jpg", width)


def check_math(report: PageReport, probe: dict, typeset: bool) -> None:
    if probe["maths"] and not typeset:
        report.add("math", "MathJax did not load")
    for text in probe["untypeset"]:
        report.add("math", f"not typeset: {text!r}")
    for text in probe["errors"]:
        report.add("math", f"MathJax error: {text!r}")
    for match in sorted(set(RAW_TEX.findall(probe["prose"]))):
        report.add("math", f"raw TeX in the prose: {match!r}")
    report.notes["math"] = f"{probe['maths']} formulas"


def describe(item: dict) -> str:
    return f"{item['kind']} ({item['width']} px in {item['room']} px) {item['text']!r}"


def is_external(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme not in {"data", "blob", "about", "chrome"} and (
        parts.hostname not in {"127.0.0.1", "localhost"}
    )


def check_search(driver, base: str) -> PageReport:
    report = PageReport(f"search.html?q={SEARCH_TERM}")
    driver.set_window_size(DESKTOP, 900)
    driver.get(f"{base}/search.html?q={SEARCH_TERM}")
    deadline, hits = time.monotonic() + 60, 0
    while time.monotonic() < deadline:
        hits = driver.execute_script(
            "return document.querySelectorAll('#search-results li').length"
        )
        if hits:
            break
        time.sleep(0.5)
    if not hits:
        report.add("search", f"no results for {SEARCH_TERM!r}")
    report.notes["search"] = f"{hits} results for {SEARCH_TERM!r}"
    return report


# --- the report


def print_report(reports: list[PageReport]) -> None:
    for report in reports:
        status = "ok" if report.ok else "FAIL"
        print(f"\n== {report.page}: {status}")
        for key, value in report.notes.items():
            print(f"   {key:12} {value}")
        for category, messages in report.defects.items():
            print(f"   {category.upper()}: {len(messages)}")
            for message in messages:
                print(f"     - {message}")
    categories = sorted({c for r in reports for c in r.defects})
    print("\nDefects per page and category")
    print(f"{'page':36}" + "".join(f"{c[:10]:>11}" for c in categories))
    for report in reports:
        counts = "".join(f"{len(report.defects.get(c, [])):>11}" for c in categories)
        print(f"{report.page[:36]:36}{counts}")
    failing = sum(not r.ok for r in reports)
    print(f"\n{len(reports) - failing} passed, {failing} failed")


def pages_of(site: Path) -> list[str]:
    skip = ("_static/", "_sources/", "_images/")
    return sorted(
        path.relative_to(site).as_posix()
        for path in site.rglob("*.html")
        if not path.relative_to(site).as_posix().startswith(skip)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", nargs="?", default="_build/html", type=Path)
    parser.add_argument("--pages", nargs="*", help="pages relative to the site")
    parser.add_argument("--screenshots", type=Path, default=Path("_build/screenshots"))
    args = parser.parse_args(argv)
    if not (args.site / "index.html").is_file():
        print(f"{args.site}/index.html does not exist; run `make book` first")
        return 2
    started = time.monotonic()
    pages = args.pages or pages_of(args.site)
    args.screenshots.mkdir(parents=True, exist_ok=True)
    reports = [check_static(args.site, page) for page in pages]
    server = serve(args.site)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    driver = start_browser()
    try:
        for report in reports:
            if "redirect" not in report.notes:
                check_in_browser(driver, base, report, args.screenshots)
        reports.append(check_search(driver, base))
    finally:
        driver.quit()
        server.shutdown()
    print_report(reports)
    print(f"checked {len(pages)} pages in {time.monotonic() - started:.0f} s")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
