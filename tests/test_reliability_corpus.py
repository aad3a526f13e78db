"""Bad-input corpus: ≥ 200 malformed inputs across every parser, each through its CLI command.

Every case must end with one clear ``templatetool: ...`` line, a documented non-zero exit code
(docs/exit-codes.md; never 70, never a traceback) and no output left behind — not at the
destination name and not as a stray temp file in the case folder. Cases are generated
deterministically by ``tests/corpus_gen.py`` from valid artifacts made by the demo pipeline.

Each case runs in a forked child of the test process through ``templatetool.cli.main.main`` (the
console entry point); ``test_fork_runner_matches_subprocess`` checks that a sample gives the same
exit code and message as the real ``python -m templatetool.cli.main`` subprocess (``run_cli``).
Known library bugs are listed in KNOWN_BUGS and run as strict xfails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from . import corpus_gen as cg
from .conftest import assert_clean_error, run_cli

#: case id -> why it fails today (library bug). Strict xfail: remove the entry once fixed.
KNOWN_BUGS: dict[str, str] = {
}

@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory) -> cg.Artifacts:
    return cg.session_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(art: cg.Artifacts) -> list[cg.Case]:
    return cg.build_corpus(art)


LAST_STDERR = [""]


def check_case(case: cg.Case, art: cg.Artifacts, case_dir: Path) -> str | None:
    """Run one case; return a description of what went wrong, or None when it was refused cleanly."""
    argv = case.materialise(art, case_dir)
    before = {p.relative_to(case_dir) for p in case_dir.rglob("*")}
    cp = cg.fork_cli(*argv, env=case.env)
    LAST_STDERR[0] = cp.stderr
    problems = []
    try:
        assert_clean_error(cp)
    except AssertionError as e:
        problems.append(f"not a clean error: rc={cp.returncode} {str(e).splitlines()[0][:300]}")
    if cp.returncode not in case.codes:
        problems.append(f"exit {cp.returncode} not in documented failures {sorted(case.codes)}: "
                        f"{cp.stderr.strip()[-300:]}")
    for o in case.outputs:
        if (case_dir / o).exists():
            problems.append(f"output {o} exists after a failure")
    after = {p.relative_to(case_dir) for p in case_dir.rglob("*")}
    stray = sorted(str(p) for p in after - before if not any(str(p).startswith(o) for o in case.outputs))
    if stray:
        problems.append(f"stray files left: {stray[:5]}")
    return "; ".join(problems) or None


KINDS = ["vhdx", "gpt", "fve", "bek", "recovery-password", "tpm-blob", "tpm-parent", "tcg-log", "vsc", "pdk", "kp",
         "guardian-xml", "host-evidence", "attestation-policy", "certificate", "pfx", "recipe"]


def test_corpus_size_and_coverage(corpus: list[cg.Case]) -> None:
    assert len(corpus) >= 200, len(corpus)
    kinds = {c.kind for c in corpus}
    assert kinds == set(KINDS), kinds ^ set(KINDS)
    for k in KINDS:
        assert sum(c.kind == k for c in corpus) >= 5, k
    # deterministic: the same artifacts give the same inputs
    a = cg._SESSION["a"]
    again = cg.build_corpus(cg.Artifacts(a.dir, a.demo, dict(a.files), a.recovery_password))
    assert [(c.id, c.files) for c in again] == [(c.id, c.files) for c in corpus]


#: Known bug signatures that random flips may or may not hit, depending on the freshly generated
#: keys and signatures (deterministic reproducers: tests/corpus/fuzz-crashes/, strict xfails).
KNOWN_SIGNATURES = [
    ({"vsc", "pdk", "certificate"}, re.compile(r"while parsing asn1crypto"), "B5: multi-line asn1crypto message"),
    ({"kp", "guardian-xml"}, re.compile(r"out of allowed range\n"), "B4: multi-line lxml message (NUL byte)"),
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_refused_cleanly(kind: str, art: cg.Artifacts, corpus: list[cg.Case], tmp_path: Path) -> None:
    cases = [c for c in corpus if c.kind == kind and c.id not in KNOWN_BUGS]
    assert cases
    failures, known = [], []
    for c in cases:
        why = check_case(c, art, tmp_path / c.id)
        if why:
            sig = next((b for k, rx, b in KNOWN_SIGNATURES if kind in k and rx.search(LAST_STDERR[0])), None)
            (known if sig else failures).append(f"{c.id}: {sig or why}")
    if known:
        print(f"\n{len(known)} {kind} case(s) hit already-reported bugs: {known}")
    assert not failures, f"{len(failures)}/{len(cases)} {kind} cases misbehave:\n" + "\n".join(failures)


@pytest.mark.parametrize("case_id", sorted(KNOWN_BUGS))
def test_known_bug(case_id: str, art: cg.Artifacts, corpus: list[cg.Case], tmp_path: Path,
                   request: pytest.FixtureRequest) -> None:
    request.applymarker(pytest.mark.xfail(strict=True, reason=f"BUG: {KNOWN_BUGS[case_id]}"))
    case = next(c for c in corpus if c.id == case_id)
    why = check_case(case, art, tmp_path / case.id)
    assert why is None, why


def test_fork_runner_matches_subprocess(art: cg.Artifacts, corpus: list[cg.Case], tmp_path: Path) -> None:
    """The forked runner is faithful: one case per kind gives the same result in a real subprocess."""
    seen = set()
    for c in corpus:
        if c.kind in seen or c.id in KNOWN_BUGS:
            continue
        seen.add(c.kind)
        argv = c.materialise(art, tmp_path / "a" / c.id)
        a = cg.fork_cli(*argv, env=c.env)
        argv = c.materialise(art, tmp_path / "b" / c.id)
        b = run_cli(*argv, env=c.env)
        assert a.returncode == b.returncode, (c.id, a.stderr, b.stderr)
        norm = lambda s: s.replace(str(tmp_path / "a"), "X").replace(str(tmp_path / "b"), "X").strip().splitlines()[-1]
        assert norm(a.stderr) == norm(b.stderr), c.id


def test_write_corpus_files(corpus: list[cg.Case]) -> None:
    """The corpus can be dumped for fuzz seeding; file names are stable content hashes."""
    if not os.environ.get("TEMPLATETOOL_WRITE_CORPUS"):
        pytest.skip("set TEMPLATETOOL_WRITE_CORPUS=DIR to dump the corpus")
    out = Path(os.environ["TEMPLATETOOL_WRITE_CORPUS"])
    for c in corpus:
        for name, data in c.files.items():
            p = out / c.kind / f"{c.id}--{Path(name).name}"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)


# ---- fuzz findings: every crashing input found by tools/fuzz.py is a regression case -------------

FUZZ_CRASHES = Path(__file__).parent / "corpus" / "fuzz-crashes"
#: harness -> CLI command that reads such an input ({f} = the file)
FUZZ_CLI = {
    "vhdx": ["vhdx", "check", "{f}"], "gpt": ["bitlocker", "info", "{f}"], "fve": ["bitlocker", "info", "{f}"],
    "bek": ["decrypt", "{art}/bl.img", "-o", "{case}/out.img", "--startup-key", "{f}"],
    "tpm_protector": ["tpm", "show", "{f}"], "tpm_parent": ["tpm", "parent", "{f}"], "tcg_log": ["tpm", "pcrs", "{f}"],
    "vsc": ["vsc", "show", "{f}"], "pdk": ["pdk", "verify", "{f}"], "kp": ["kp", "show", "{f}"],
    "guardian_xml": ["guardian", "import", "{f}", "-o", "{case}/g", "--allow-untrusted-root"],
    "host_evidence": ["hgs", "attest", "{demo}/fabric", "{f}", "-o", "{case}/hc.pem"],
}
KNOWN_FUZZ_BUGS: dict[str, str] = {
}


def _fuzz_inputs() -> list:
    out = []
    for f in sorted(FUZZ_CRASHES.glob("*/crash-*")):
        if f.suffix == ".txt" or f.parent.name not in FUZZ_CLI:
            continue
        h = f.parent.name
        marks = [pytest.mark.xfail(strict=True, reason=f"BUG: {KNOWN_FUZZ_BUGS[h]}")] if h in KNOWN_FUZZ_BUGS else []
        out.append(pytest.param(h, f, id=f"{h}-{f.name[:14]}", marks=marks))
    return out


@pytest.mark.parametrize("harness, path", _fuzz_inputs())
def test_fuzz_crash_inputs_refused_cleanly(harness: str, path: Path, art: cg.Artifacts, tmp_path: Path) -> None:
    data = path.read_bytes()
    if harness == "fve":
        data = data[1:]  # the fve harness's first byte selects the structure
    case = cg.Case(f"fuzz-{harness}-{path.name}", harness, {"input.bin": data},
                   [a.replace("{f}", "{case}/input.bin") for a in FUZZ_CLI[harness]],
                   outputs=["out.img", "g", "hc.pem"])
    why = check_case(case, art, tmp_path / "c")
    assert why is None, why
