"""The README and docs/: every relative link resolves to a file in the repository, no document points
outside it, and measurements are named by machine and date."""
import glob
import os
import re

from conftest import ROOT

DOCS = [os.path.join(ROOT, 'README.md'), os.path.join(ROOT, 'benchmarks', 'NOTES.md')] + \
    sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        text = open(doc).read()
        for target in re.findall(r'\]\(([^)\s]+)\)', text):
            if re.match(r'[a-z]+://', target) or target.startswith('#'):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(doc), target.split('#')[0]))
            if not os.path.exists(path):
                broken.append(f'{os.path.relpath(doc, ROOT)} -> {target}')
    assert not broken, broken


def test_no_pointers_outside_the_repository_or_to_how_work_was_organised():
    # (glob leaves out hidden folders: .venv and the git-ignored checkouts)
    sources = [f for f in glob.glob(os.path.join(ROOT, '**', '*.py'), recursive=True) if f != os.path.abspath(__file__)]
    for doc in DOCS + sources:
        text = open(doc).read()
        for word in ('SPEC.md', 'BENCH.md', 'session 1', 'session 2', 'session 3', 'Session '):
            assert word not in text, (os.path.relpath(doc, ROOT), word)


def test_readme_is_a_front_door():
    lines = open(os.path.join(ROOT, 'README.md')).read().splitlines()
    assert len(lines) <= 200
    assert lines[0].startswith('# ') and any('./demo.sh' in l for l in lines[:20])
