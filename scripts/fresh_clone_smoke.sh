#!/usr/bin/env bash
# A newcomer's path, proved: clone, bootstrap with no DATABASE_URL/REDIS_URL, `dataloader up`,
# wait for the page, start a demo run from a second "terminal" and see it succeed, then Ctrl-C.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
up_pid=""
cleanup() {
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then kill -INT "$up_pid"; wait "$up_pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
unset DATABASE_URL REDIS_URL ETL_LEDGER_SCHEMA ETL_QUEUE ETL_DATA_DIR

git clone -q "$src" "$work/p"
cd "$work/p"
make install >"$work/install.log" 2>&1 || { tail -30 "$work/install.log"; exit 1; }
port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

.venv/bin/dataloader up --port "$port" --workers 2 >"$work/up.log" 2>&1 &
up_pid=$!
url="http://127.0.0.1:$port/etl/data-loader"
for _ in $(seq 1 240); do
  if curl -fsS -o /dev/null "$url" 2>/dev/null; then break; fi
  if ! kill -0 "$up_pid" 2>/dev/null; then echo "dataloader up died:"; cat "$work/up.log"; exit 1; fi
  sleep 1
done
curl -fsS -o /dev/null "$url" || { echo "the console never answered at $url"; cat "$work/up.log"; exit 1; }
grep -q "$url" "$work/up.log" || { echo "dataloader up did not print $url"; cat "$work/up.log"; exit 1; }
echo "console answers at $url"

# No URLs exported: the CLI finds the servers `dataloader up` runs.
.venv/bin/dataloader start orders --wait >"$work/run.log" 2>&1 || { cat "$work/run.log"; exit 1; }
grep -q "status:      ✔ success" "$work/run.log" || { cat "$work/run.log"; exit 1; }
grep -E "^(etl_run_id|rows|batches):" "$work/run.log"

kill -INT "$up_pid"
wait "$up_pid"
up_pid=""
if pgrep -f "$work/p/.data" >/dev/null; then echo "servers left running after Ctrl-C"; pgrep -af "$work/p/.data"; exit 1; fi
echo "fresh clone: bootstrap, console, demo run and clean stop all passed"
