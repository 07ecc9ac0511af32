"""Every command the README shows runs as written: the script commands parse with the script's own argument parser
(the toy ones also run for real in each method's toy test), the helper commands run, and the test command is CI's."""
import importlib, re, shlex, subprocess, sys
import pytest
from conftest import ROOT

README = (ROOT / 'README.md').read_text()

def readme_commands():
    blocks = re.findall(r'```bash\n(.*?)```', README, re.S)
    lines = [l.split('  #')[0].strip() for b in blocks for l in b.splitlines()]
    inline = re.findall(r'`((?:python|torchrun) [^`<]+)`', README)
    return sorted({c for c in lines + inline if c})

COMMANDS = readme_commands()

def test_readme_has_the_commands_a_user_needs():
    assert 'pip install -r requirements.txt' in COMMANDS and 'python -m pytest -q tests' in COMMANDS
    for s in ('dmd', 'dibregman', 'gan_only', 'sid', 'consistency'):
        assert any(c.startswith(f'python {s}.py') for c in COMMANDS), s
    assert 'python -m pytest -q tests' in (ROOT / '.ci' / 'run').read_text()      # CI runs the README's test command
    for figure in ('toy_gallery.png', 'toy_training.gif', 'dibregman_modes.png'):
        assert (ROOT / 'figures' / figure).exists() and f'figures/{figure}' in README, figure
    assert (ROOT / 'figures' / 'toy_training.gif').stat().st_size < 3.5e6

@pytest.mark.parametrize('cmd', [c for c in COMMANDS if re.match(r'(python|torchrun)( --\S+)* \w+\.py', c)])
def test_script_command_parses(cmd, capsys):
    words = shlex.split(cmd)
    i = next(k for k, w in enumerate(words) if w.endswith('.py'))
    cfg = importlib.import_module(words[i][:-3]).get_config(words[i + 1:])   # an argparse error would exit here
    assert cfg.script == words[i][:-3]

def test_helper_commands_run():
    for cmd in COMMANDS:
        if cmd.startswith('python tests/') or cmd.startswith('python figures/'):
            args = shlex.split(cmd)[1:] + (['--help'] if cmd.startswith('python figures/') else [])   # the gallery takes 10 minutes
            r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, (cmd, r.stderr[-2000:])
