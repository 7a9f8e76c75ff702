"""The paper's claims checked against a study's numbers (test split and control)."""
from __future__ import annotations


def verdict(results: dict) -> list[dict]:
    """One entry per claim of the paper: what was measured and whether it holds here (test/UDHR)."""
    rep = results["dev"]["representation"]
    out = []
    for t, tr in results["test"].items():
        if t == "pre":
            continue
        for s in ("a", "b"):
            st = tr["retrieval"][rep]["settings"].get(s)
            if not st:
                continue
            d, lo, hi = st["delta"]
            holds = lo > 0
            out.append({"claim": f"retrieval improves, setting ({s})", "target": t, "data": "bible test",
                        "pre": st["pre"][0], "post": st["post"][0], "delta": [d, lo, hi],
                        "holds": bool(holds), "verdict": "yes" if holds else ("worse" if hi < 0 else "no (CI spans 0)")})
        dp, dq = tr["distances"]["pre"]["mean_pairwise"], tr["distances"]["post"]["mean_pairwise"]
        out.append({"claim": "mean pairwise distance between languages shrinks", "target": t,
                    "data": "bible test", "pre": dp, "post": dq,
                    "holds": bool(dq is not None and dp is not None and dq < dp)})
        ctl = results["control"].get(t)
        if ctl:
            ex = ctl["experts"]["retrieval"][rep]["a"] - ctl["pre"]["retrieval"][rep]["a"]
            rd_mean, rd_sd = ctl["random"]["retrieval"][rep]["a"]
            rd = rd_mean - ctl["pre"]["retrieval"][rep]["a"]
            out.append({"claim": "random neurons (same k, same values) do not help; experts help more",
                        "target": t, "data": "bible test subset", "experts_delta": ex,
                        "random_delta": rd, "random_sd": rd_sd,
                        "holds": bool(ex > rd + 2 * rd_sd and rd <= 2 * rd_sd + 1e-12)})
    return out
