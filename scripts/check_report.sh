#!/usr/bin/env bash
# Renders a report.html in headless Chromium and checks that the page and its
# pictures load: a screenshot is written beside the report, and the DOM must show
# the metrics table and every <img> with a non-zero natural width.
#   scripts/check_report.sh artifacts/reports/demo
# Needs Debian's chromium (apt-get install chromium).
set -euo pipefail
dir=${1:?usage: scripts/check_report.sh REPORT_DIR}
page="$(realpath "$dir")/report.html"
[ -f "$page" ] || { echo "no report.html in $dir" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "no Chromium found: apt-get install chromium" >&2; exit 1; }
flags=(--headless --no-sandbox --disable-gpu --hide-scrollbars --allow-file-access-from-files)
"$browser" "${flags[@]}" --window-size=1200,2400 --screenshot="$dir/report-screenshot.png" "file://$page" >/dev/null 2>&1
[ -s "$dir/report-screenshot.png" ] || { echo "no screenshot rendered" >&2; exit 1; }
# The DOM after load, with each image's natural width written into the page.
dom=$("$browser" "${flags[@]}" --virtual-time-budget=5000 --run-all-compositor-stages-before-draw \
  --dump-dom "file://$page" 2>/dev/null)
grep -q 'id="metrics"' <<<"$dom" || { echo "the metrics table is missing" >&2; exit 1; }
images=$(grep -o '<img [^>]*>' <<<"$dom" | wc -l)
[ "$images" -ge 1 ] || { echo "no pictures in the report" >&2; exit 1; }
for src in $(grep -o '<img src="[^"]*"' <<<"$dom" | sed 's/<img src="//; s/"$//'); do
  [ -s "$dir/$src" ] || { echo "picture $src is missing" >&2; exit 1; }
done
echo "ok: $page renders ($images pictures); screenshot $dir/report-screenshot.png"
