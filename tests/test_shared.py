"""The contract every script keeps: identical shared sections, the line cap, no import side
effects, documented flags, argparse-style errors."""
import importlib, os, re, subprocess, sys
import pytest
from conftest import ROOT, SCRIPTS, run

SECTIONS = ['EDM network', 'EDM teacher', 'toy world', 'data and evaluation', 'run plumbing']
PAT = re.compile(r'^# === BEGIN SHARED: (.+?) ===$(.*?)^# === END SHARED: \1 ===$', re.S | re.M)

def sections(script):
    return {m.group(1): m.group(2) for m in PAT.finditer((ROOT / f'{script}.py').read_text())}

def test_shared_sections_identical():
    ref = sections('dmd')
    assert sorted(ref) == sorted(SECTIONS)
    for s in SCRIPTS:
        assert sections(s) == ref, f'{s}.py: shared sections differ from dmd.py'

@pytest.mark.parametrize('script', SCRIPTS)
def test_line_cap(script):
    assert len((ROOT / f'{script}.py').read_text().splitlines()) <= 800

@pytest.mark.parametrize('script', SCRIPTS)
def test_import_has_no_side_effects(script, tmp_path):
    env = dict(os.environ, DISTILL_CACHE=str(tmp_path / 'cache'))
    r = subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {str(ROOT)!r}); import {script}'],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == ''
    assert list(tmp_path.iterdir()) == []                       # no files, not even the cache folder

@pytest.mark.parametrize('script', SCRIPTS)
def test_help_documents_every_flag(script):
    r = run(script, '--help')
    assert r.returncode == 0
    flags = set(re.findall(r"(?:A|add_argument)\('(--[a-z0-9-]+)'", (ROOT / f'{script}.py').read_text()))
    assert len(flags) >= 20
    for flag in flags:
        assert re.search(rf'^  {flag}\b', r.stdout, re.M), f'{flag} missing from --help'
    calls = re.findall(r"(?:A|add_argument)\('--[^\n]*", (ROOT / f'{script}.py').read_text())
    assert all('help=' in c for c in calls), 'every flag has a help text'

BAD_FLAGS = {'*': [['--data', 'nope'], ['--batch', '-4'], ['--kimg', '-1'], ['--lr', 'abc'], ['--lr', 'nan'], ['--seed', '1.5'],
                     ['--precision', 'fp8'], ['--no-such-flag']],
             'dmd': [['--lambda-reg', '-1'], ['--fake-steps', '0']],
             'dibregman': [['--h', 'js'], ['--lam', 'inf'], ['--weight-group', '-8'], ['--batch', '60', '--weight-group', '8']],
             'gan_only': [['--h', 'js'], ['--lam', 'x'], ['--u-min', '1.5'], ['--r1', '-1']],
             'sid': [['--alpha', '-1'], ['--tmax', '1001'], ['--init-sigma', '0']],
             'consistency': [['--mode', 'x'], ['--mu', '1'], ['--scales', '1'], ['--loss', 'l1'], ['--ct-scales', '10']]}

@pytest.mark.parametrize('script', SCRIPTS)
def test_bad_flags_are_one_line_errors(script, capsys):
    """Each bad value is an argparse error: exit code 2 and one 'script.py: error: ...' line, no traceback."""
    mod = importlib.import_module(script)
    for args in BAD_FLAGS['*'] + BAD_FLAGS[script]:
        with pytest.raises(SystemExit) as e:
            mod.get_config(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.strip().splitlines()[-1].startswith(f'{script}.py: error: '), (args, err)
    r = run(script, '--batch', '-4')                                # the same from a shell
    assert r.returncode == 2 and 'Traceback' not in r.stderr and r.stderr.strip().splitlines()[-1].startswith(f'{script}.py: error: ')

@pytest.mark.parametrize('script', SCRIPTS)
def test_resume_without_checkpoint_is_an_error(script, tmp_path, toy_teacher):
    mod = importlib.import_module(script)
    with pytest.raises(SystemExit, match='no checkpoint'):
        mod.train(mod.get_config(['--data', 'toy', '--out', str(tmp_path / 'empty'), '--resume']))
