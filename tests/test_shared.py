"""The contract every script keeps: identical shared sections, the line cap, no import side
effects, documented flags, argparse-style errors."""
import ast, importlib, io, os, re, subprocess, sys, tokenize
import pytest
import torch
from conftest import ROOT, SCRIPTS, run

SECTIONS = ['EDM network', 'EDM teacher', 'small worlds', 'data and evaluation', 'run plumbing']
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
    """The budget: at most 980 lines a script, 775 in the shared part (from the banner to the end)."""
    lines = (ROOT / f'{script}.py').read_text().splitlines()
    banner = next(i for i, line in enumerate(lines) if line.startswith('# ==== Everything below is identical'))
    assert len(lines) <= 980 and len(lines) - banner <= 775, (len(lines), len(lines) - banner)

def test_the_test_cache_folder_is_made_when_missing(tmp_path):
    """DISTILL_TEST_CACHE naming a folder that does not exist yet: the tests make it and use it."""
    cache = tmp_path / 'not' / 'there'
    r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                        'tests/test_dmd.py::test_lpips_offline_error_names_url_and_place', 'tests/test_edm.py::test_preconditioning_is_edm_table_1'],
                       cwd=ROOT, env=dict(os.environ, DISTILL_TEST_CACHE=str(cache)), capture_output=True, text=True)
    assert r.returncode == 0 and '2 passed' in r.stdout, r.stdout[-2000:]
    assert cache.is_dir()

@pytest.mark.parametrize('script', SCRIPTS)
def test_method_comes_before_the_shared_sections(script):
    lines = (ROOT / f'{script}.py').read_text().splitlines()
    first_shared = next(i for i, line in enumerate(lines) if line.startswith('# === BEGIN SHARED'))
    assert next(i for i, line in enumerate(lines) if line.startswith('def train(cfg, extract=None')) < first_shared
    assert lines[first_shared - 2].startswith('# ==== Everything below is identical in all five scripts')
    assert lines[-2:] == ["if __name__ == '__main__':", '    main()']

def style_problems(src):
    """The writing rules (README, "Reading the code"): lines of at most 120 characters, one statement per line (no ';',
    no compound statement with its body on the same line, except a lone `if cond: simple_statement` guard), no
    assignment expressions, no lambda bound to a name."""
    problems = [f'{i}: {len(line)} characters' for i, line in enumerate(src.splitlines(), 1) if len(line) > 120]
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.OP and tok.string in (';', ':='):
            problems.append(f'{tok.start[0]}: {tok.string!r}')
        if tok.type == tokenize.NAME and tok.string in ('else', 'try', 'finally') and tok.line.strip().startswith(tok.string):
            if not re.fullmatch(r'\s*(else|try|finally)\s*:\s*(#.*)?', tok.line.rstrip('\n')):
                problems.append(f'{tok.start[0]}: a body after {tok.string}:')
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.If, ast.For, ast.While, ast.With, ast.Try, ast.FunctionDef, ast.ClassDef,
                             ast.ExceptHandler)) and node.body[0].lineno == node.lineno:
            lone_guard = isinstance(node, ast.If) and len(node.body) == 1 and not node.orelse
            if not lone_guard or not isinstance(node.body[0], (ast.Return, ast.Raise, ast.Assign, ast.Expr,
                                                               ast.AugAssign, ast.Continue, ast.Break)):
                problems.append(f'{node.lineno}: {type(node).__name__.lower()} with its body on the same line')
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            problems.append(f'{node.lineno}: a lambda bound to a name (use def)')
    return problems

@pytest.mark.parametrize('script', SCRIPTS)
def test_written_to_be_read(script):
    assert style_problems((ROOT / f'{script}.py').read_text()) == []

def test_the_style_check_can_fail():
    bad = ('x = 1; y = 2\nif (n := 3): pass\nf = lambda v: v\nfor i in range(3): print(i)\nif x: y = 1\nelse: y = 2\n'
           'try: x = 1\nexcept ValueError: pass\nz = "' + 'a' * 120 + '"\n')
    found = style_problems(bad)
    for what in ("';'", "':='", 'lambda bound', 'for with its body', 'a body after else:', 'a body after try:',
                 'excepthandler with its body', '126 characters'):
        assert any(what in p for p in found), (what, found)
    assert style_problems('if x: return_value = 1\nif y:\n    z = 2\nelse:\n    z = 3\n') == []

@pytest.mark.parametrize('script', SCRIPTS)
def test_import_has_no_side_effects(script, tmp_path):
    env = dict(os.environ, DISTILL_CACHE=str(tmp_path / 'cache'))
    r = subprocess.run([sys.executable, '-c', f'import sys; sys.path.insert(0, {str(ROOT)!r}); import {script}'],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == ''
    assert list(tmp_path.iterdir()) == []                       # no files, not even the cache folder

def flag_calls(script):
    """Every A('--flag', ...) / add_argument('--flag', ...) call in the script, as AST nodes."""
    tree = ast.parse((ROOT / f'{script}.py').read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant)
            and str(n.args[0].value).startswith('--') and getattr(n.func, 'id', getattr(n.func, 'attr', '')) in
            ('A', 'add_argument')]

@pytest.mark.parametrize('script', SCRIPTS)
def test_help_documents_every_flag(script):
    r = run(script, '--help')
    assert r.returncode == 0
    calls = flag_calls(script)
    assert len(calls) >= 20
    for call in calls:
        flag = call.args[0].value
        assert re.search(rf'^  {flag}\b', r.stdout, re.M), f'{flag} missing from --help'
        assert any(k.arg == 'help' for k in call.keywords), f'{flag} has no help text'
    assert re.search(r'--seed SEED +random seed \(default: 0\)', r.stdout)      # a default of 0 is shown too

BAD_FLAGS = {'*': [['--data', 'nope'], ['--batch', '-4'], ['--kimg', '-1'], ['--lr', 'abc'], ['--lr', 'nan'], ['--seed', '1.5'],
                     ['--precision', 'fp8'], ['--no-such-flag'], ['--device', 'gpu'], ['--device', 'cuda:99'],
                     ['--out', str(ROOT / 'README.md')]],
             'dmd': [['--lambda-reg', '-1'], ['--fake-steps', '0'], ['--reg-loss', 'l1'], ['--data', 'toy', '--reg-loss', 'lpips'],
                     ['--fake-score', 'nope'], ['--fake-score', 'generator', '--fake-steps', '5']],
             'dibregman': [['--h', 'js'], ['--lam', 'inf'], ['--weight-group', '-8'], ['--batch', '60', '--weight-group', '8'],
                           ['--reward-beta', 'nan'], ['--reward-cap', '-1'], ['--reward-estimator', 'exact']],
             'gan_only': [['--h', 'js'], ['--lam', 'x'], ['--u-min', '1.5'], ['--r1', '-1']],
             'sid': [['--alpha', '-1'], ['--tmax', '1001'], ['--init-sigma', '0'], ['--augment', '1.5'],
                     ['--data', 'toy', '--augment', '0.1']],
             'consistency': [['--mode', 'x'], ['--scales', '1'], ['--loss', 'l1'], ['--ct-scales', '10'],
                             ['--data', 'toy', '--loss', 'lpips']]}

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
    assert not (tmp_path / 'empty').exists()

@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal is for machines without a GPU')
@pytest.mark.parametrize('script', SCRIPTS)
def test_cifar_training_on_a_cpu_needs_device_cpu(script, tmp_path):
    """Without a GPU, a CIFAR-10 run is refused in one line that gives its time and memory, and writes nothing;
    --device cpu (the tests, a user who means it) and --bench go ahead."""
    r = run(script, '--kimg', '20000', '--batch-gpu', '64', cwd=tmp_path)
    assert r.returncode == 1 and not (tmp_path / 'runs').exists()
    assert r.stderr.strip().splitlines() == ['error: no GPU. On a CPU this CIFAR-10 run takes 3.2 years (5 s per image, '
                                             '2 cores) and 22 GiB; try --data toy, or --device cpu'], r.stderr
    mod = importlib.import_module(script)
    assert mod.World(mod.get_config(['--bench', '1', '--model-channels', '16'])).device.type == 'cpu'
