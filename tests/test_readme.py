"""Every command the README shows runs as written: the script commands parse with the script's own argument parser
(the toy ones also run for real in each method's toy test), the helper commands run, and the test command is CI's;
and every table of README.md and docs/*.md renders."""
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
    assert 'pip install -r requirements.txt' in COMMANDS and 'python -m pytest -q -n auto tests' in COMMANDS
    for s in ('dmd', 'dibregman', 'gan_only', 'sid', 'consistency'):
        assert any(c.startswith(f'python {s}.py') for c in COMMANDS), s
    assert 'python -m pytest -q -n auto tests --durations=15' in (ROOT / '.ci' / 'run').read_text()   # CI runs the
    # README's test command, and prints the 15 slowest tests
    for figure in ('toy_gallery.png', 'toy_training.gif', 'dibregman_modes.png', 'digits_gallery.png'):
        assert (ROOT / 'figures' / figure).exists() and f'figures/{figure}' in README, figure
    assert (ROOT / 'figures' / 'toy_training.gif').stat().st_size < 3.5e6

SCRIPT_COMMAND = r'(python|torchrun)( --\S+)* \w+\.py'

@pytest.mark.parametrize('cmd', [c for c in COMMANDS if re.match(SCRIPT_COMMAND, c)])
def test_script_command_parses(cmd, capsys):
    words = shlex.split(cmd)
    i = next(k for k, w in enumerate(words) if w.endswith('.py'))
    try:
        cfg = importlib.import_module(words[i][:-3]).get_config(words[i + 1:])   # an argparse error exits here
    except SystemExit as e:                  # --resume / --eval-only of a run that is not here: all else parsed
        assert re.match(r'error: no checkpoint \S+ckpt.pt to --resume or --eval-only$', str(e)), (cmd, e)
        return
    assert cfg.script == words[i][:-3]

def out_of(cmd):   # the run folder a script command writes, or None for one that writes none or reuses one
    words = shlex.split(cmd)
    i = next(k for k, w in enumerate(words) if w.endswith('.py'))
    flags = dict(zip(words[i + 1:], words[i + 2:] + ['']))
    if {'--bench', '--help', '--resume', '--eval-only'} & set(words): return None
    return flags.get('--out', f"runs/{words[i][:-3]}-{flags.get('--data', 'cifar10')}")

def test_no_two_commands_of_a_section_share_an_out():
    """Run in order, the commands of one section (code blocks and prose; table rows are references, not a sequence)
    never find --out holding another's run: only --resume and --eval-only may name a folder another command made."""
    for section in re.split(r'\n#+ ', README):
        text = '\n'.join(l for l in section.splitlines() if not l.startswith('|'))
        blocks = [l.split('  #')[0].strip() for b in re.findall(r'```bash\n(.*?)```', text, re.S) for l in b.splitlines()]
        prose = re.findall(r'`((?:python|torchrun) [^`<]+)`', re.sub(r'```.*?```', '', text, flags=re.S))
        outs = [out_of(c) for c in dict.fromkeys(blocks + prose) if re.match(SCRIPT_COMMAND, c)]
        outs = [o for o in outs if o]
        assert len(outs) == len(set(outs)), (section.splitlines()[0], sorted(o for o in outs if outs.count(o) > 1))

def test_helper_commands_run():
    for cmd in COMMANDS:
        if cmd.startswith('python tests/') or cmd.startswith('python figures/'):
            args = shlex.split(cmd)[1:] + (['--help'] if cmd.startswith('python figures/') else [])   # the gallery takes 10 minutes
            r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, (cmd, r.stderr[-2000:])

def test_every_table_renders():
    """Every line that starts with `|`, in README.md and in docs/*.md, lies inside a table that a CommonMark parser
    with tables (markdown-it-py, GitHub's rules) renders: rows after a blank line without a header row do not."""
    from markdown_it import MarkdownIt
    md = MarkdownIt('commonmark').enable('table')
    stray = []
    for path in [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]:
        text = path.read_text()
        tables = [t.map for t in md.parse(text) if t.type == 'table_open']
        stray += [f'{path.relative_to(ROOT)}:{n + 1}: {line[:70]}' for n, line in enumerate(text.splitlines())
                  if line.startswith('|') and not any(a <= n < b for a, b in tables)]
    assert not stray, stray
