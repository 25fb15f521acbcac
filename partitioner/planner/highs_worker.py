"""The HiGHS worker process: run as a script (``python highs_worker.py``) by `highs_proc`.

It imports only the standard library, numpy and highspy (not torch, not this package) and
answers one pickled job at a time on its stdin/stdout ([Note: HiGHS in a process] in
`highs_proc`): a job is a HiGHS model as arrays, its options, a MIP start and a stop time;
the answer is the model status, the column values and the dual bound. HiGHS itself may
write to fd 1, so the answers go to a copy of it and fd 1 points at /dev/null. The process
ends when its stdin closes, and by itself when its parent is gone.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]  # this folder's modules (plan.py, ...) must not shadow anything

import pickle  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

#: seconds between two checks that the parent is still there
ORPHAN_CHECK = 0.5


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(ORPHAN_CHECK)
        if os.getppid() != parent:
            os._exit(0)  # the parent died mid-solve: nobody reads this answer


def _solve(job: dict, highspy, np) -> dict:  # type: ignore[no-untyped-def]
    stop_at = time.perf_counter() + job["seconds"]
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = job["num_col"], job["num_row"]
    lp.col_cost_, lp.col_lower_ = job["col_cost"], job["col_lower"]
    lp.col_upper_ = job["col_upper"]
    lp.row_lower_, lp.row_upper_ = job["row_lower"], job["row_upper"]
    lp.integrality_ = [highspy.HighsVarType(int(v)) for v in job["integrality"]]
    lp.sense_, lp.offset_ = highspy.ObjSense(job["sense"]), job["offset"]
    a = highspy.HighsSparseMatrix()
    a.format_ = highspy.MatrixFormat(job["format"])
    a.num_col_, a.num_row_ = job["num_col"], job["num_row"]
    a.start_, a.index_, a.value_ = job["start"], job["index"], job["value"]
    lp.a_matrix_ = a
    h.passModel(lp)
    for name, value in job["options"].items():
        h.setOptionValue(name, value)
    idx, val = job["mip_start"]
    if len(idx):
        h.setSolution(len(idx), np.asarray(idx, np.int32), np.asarray(val, np.float64))

    def check(event) -> None:  # type: ignore[no-untyped-def]
        if time.perf_counter() >= stop_at:
            event.interrupt()

    for event in (h.cbMipInterrupt, h.cbSimplexInterrupt, h.cbIpmInterrupt):
        event.subscribe(check)
    h.run()
    info = h.getInfo()
    return {
        "status": int(h.getModelStatus()),
        "col_value": np.asarray(h.getSolution().col_value, np.float64),
        "objective": float(h.getObjectiveValue()),
        "dual_bound": float(info.mip_dual_bound),
        "primal_status": int(info.primal_solution_status),
    }


def main() -> None:
    answers = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    jobs = sys.stdin.buffer
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    import highspy
    import numpy as np

    pickle.dump({"ready": True}, answers)
    answers.flush()
    while True:
        try:
            job = pickle.load(jobs)
        except EOFError:
            return
        try:
            answer = _solve(job, highspy, np)
        except Exception as e:  # handed to the parent, which falls back
            answer = {"error": f"{type(e).__name__}: {e}"}
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    main()
