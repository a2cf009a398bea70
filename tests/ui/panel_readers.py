"""The Run Monitor's live panels read from the page, and the ledger said in the words each panel uses.

Shared by the test that fails when a panel disagrees with the ledger for too long
(``tests/ui/test_live_panels.py``) and the benchmark that times each panel's lag behind a ledger
change (``bench/console.py --panels``): both must read a panel the same way, or the benchmark would
time something the test does not prove.
"""

from __future__ import annotations

from typing import Any

#: What the page shows, read in one evaluation (argument: the run id whose Recent runs row is read):
#: badge, metric cards, the "No batches yet" state, the left panel's warning, every drawn grid row's
#: status by batch index, the run's status in Recent runs (the monitor's list, or the Recent runs page's),
#: the selected batch's detail line and retry timeline (attempt statuses), and the duration chart's count.
PANELS_JS = """(run) => {
  const badge = document.querySelector('.stMarkdownBadge');
  const cards = {};
  for (const c of document.querySelectorAll('.dl-cards .dl-card')) {
    cards[c.querySelector('dt').textContent] = c.querySelector('dd').textContent;
  }
  const text = document.body.innerText;
  const warn = [...document.querySelectorAll('[data-testid="stAlertContentWarning"]')].map(e => e.innerText);
  const f = document.querySelector("iframe[title='st_aggrid.AgGrid.agGrid']");
  let rows = null;
  if (f && f.contentDocument) {
    rows = {};
    for (const pin of f.contentDocument.querySelectorAll(".ag-pinned-left-cols-container .ag-row")) {
      const at = pin.getAttribute('row-index');
      const index = pin.querySelector("[col-id='index']");
      const st = f.contentDocument.querySelector(`.ag-row[row-index='${at}'] [col-id='status']`);
      if (index && st) rows[index.textContent.trim()] = st.textContent.trim();
    }
  }
  let recent = null;  // Recent runs (a canvas grid, with an accessible table of its visible cells)
  const runs = document.querySelector('[data-testid="stDataFrame"] table[role="grid"]');
  if (runs) {
    const heads = [...runs.querySelectorAll('th')].map(h => h.textContent);
    const at = (name) => heads.indexOf(name);
    for (const tr of runs.querySelectorAll('tbody tr')) {
      const cells = [...tr.querySelectorAll('td')].map(td => td.textContent);
      if (cells[at('Run ID')] === run) recent = cells[at('Status')];
    }
  }
  const detail = [...document.querySelectorAll('[data-testid="stText"]')].map(e => e.innerText)
    .find(t => t.startsWith('Status: '));
  const timeline = document.querySelector('table.dl-timeline');
  const attempts = timeline ? [...timeline.querySelectorAll('tbody tr')].map(
    tr => tr.querySelectorAll('td')[1].textContent).join(',') : null;
  const captions = [...document.querySelectorAll('[data-testid="stCaptionContainer"]')].map(e => e.innerText);
  const chart = captions.find(t => t.includes('committed batches: durations'))
    || (captions.some(t => t.startsWith('No committed batches yet')) ? '0' : null);
  return {badge: badge ? badge.innerText.replace(/^\\S+\\s*/, '').trim() : null,
          cards: cards, empty: text.includes('No batches yet'), warning: warn.join(' '), rows: rows,
          recent: recent, detail: detail ? detail.split(' · rows ')[0] : null, timeline: attempts,
          chart: chart ? chart.split(' ')[0] : null};
}"""


def warning_words(text: str) -> str:
    """The left panel's warning as '<run> of this job is <status>' ('' when there is none)."""
    return " ".join(text.replace("`", "").split()).split("Run ", 1)[-1].split(":")[0] if text else ""


def row_label(status_cell: str | None) -> str | None:
    """A grid row's status without its icon ('✓ succeeded' -> 'succeeded'); None when not drawn."""
    return status_cell.split(" ", 1)[1] if status_cell and " " in status_cell else None


def ledger_run(job: str, run: str) -> dict[str, Any]:
    """The run as the ledger says it now, in the panels' words: badge (and Recent runs) label, the
    'Batches total' / 'succeeded' / 'failed' / 'canceled' cards and the chart's count, the empty state, the
    warning."""
    import sqlalchemy as sa

    from loader import db
    from loader.ledger import batches, runs
    from ui.format import ACTIVE, run_badge

    with db.get_engine().connect() as conn:
        r = conn.execute(sa.select(runs.c.status, runs.c.batches_total).where(
            runs.c.etl_job_id == job, runs.c.etl_run_id == run)).one()
        counts = dict(conn.execute(sa.select(batches.c.status, sa.func.count()).where(
            batches.c.etl_job_id == job, batches.c.etl_run_id == run,
            batches.c.status.in_(("succeeded", "failed", "canceled"))).group_by(batches.c.status)).all())
        active = conn.execute(sa.select(runs.c.etl_run_id, runs.c.status).where(
            runs.c.etl_job_id == job, runs.c.status.in_(sorted(ACTIVE))).order_by(runs.c.started_at.desc())).first()
    ok, bad, canceled = counts.get("succeeded", 0), counts.get("failed", 0), counts.get("canceled", 0)
    return {"badge": run_badge(r.status).label, "total": f"{r.batches_total or 0:,}", "succeeded": f"{ok:,}",
            "failed": f"{bad:,}", "canceled": f"{canceled:,}",
            "empty": (r.batches_total or 0) == 0 and r.status in ("queued", "validating"),
            "warning": f"{active.etl_run_id} of this job is {active.status}" if active else "",
            "recent": run_badge(r.status).label, "chart": f"{ok:,}"}


def ledger_batch(job: str, run: str, index: int) -> dict[str, Any]:
    """One batch as the ledger says it now: its grid label, the detail line, the retry timeline's statuses."""
    import sqlalchemy as sa

    from loader import db
    from loader.contract import batch_status_label
    from loader.ledger import attempts, batches

    with db.get_engine().connect() as conn:
        b = conn.execute(sa.select(batches.c.status, batches.c.attempts).where(
            batches.c.etl_job_id == job, batches.c.etl_run_id == run, batches.c.batch_index == index)).first()
        tried = conn.execute(sa.select(attempts.c.status).where(
            attempts.c.etl_job_id == job, attempts.c.etl_run_id == run, attempts.c.batch_index == index)
            .order_by(attempts.c.attempt)).scalars().all()
    if b is None:
        return {"row": None, "detail": None, "timeline": None}
    label = batch_status_label(b.status, b.attempts)
    return {"row": label, "detail": f"Status: {label} · attempts {b.attempts}", "timeline": ",".join(tried) or None}
