"""The digits world: scikit-learn's 8x8 handwritten digits, a small EDM teacher trained here, and the judge (a
classifier of the digits) whose metrics every digits evaluation writes. Each script's short digits run is here too:
its one-step generator ends nearer the teacher's Heun samples than where it starts (the teacher's one-step blur)."""
import json, os
import numpy as np
import pytest
import torch
from conftest import SCRIPTS, digits_rows
import dmd

@pytest.fixture(scope='module')
def judge():
    return dmd.DigitsJudge(*dmd.load_digits())

def test_digits_are_the_uci_set_in_uint8():
    x, y = dmd.load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.uint8 and x.max() == 255 and x.min() == 0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert len(torch.unique(x)) == 17                                   # the set's 17 grey levels, none merged

def test_the_judge_classifies_held_out_digits(judge):
    assert judge.accuracy > 0.97, judge.accuracy                        # on the 297 digits it was not fit on

@pytest.fixture(scope='module')
def teacher_sets(digits_teacher):
    """The tests' teacher (300 steps of train_teacher; users' has 2000): its 18-step Heun samples of 1000 noises (the
    reference, as evaluation makes it), and of 1000 others in 18 and 4 steps, its one-step output, and the noise."""
    g = torch.Generator().manual_seed(1)
    reference, z = [torch.randn(1000, 1, 8, 8, generator=g) for _ in range(2)]
    sets = dict(heun18=dmd.heun_sample(digits_teacher, z), heun4=dmd.heun_sample(digits_teacher, z, steps=4),
                one_step=dmd.generate(digits_teacher, z), noise=z.clamp(-1, 1))
    return dmd.to_uint8(dmd.heun_sample(digits_teacher, reference)), {k: dmd.to_uint8(v) for k, v in sets.items()}

def test_the_judge_orders_data_teacher_steps_blur_and_noise(judge, teacher_sets):
    """The data and the teacher's 18-step Heun samples score better than its 4-step samples, and those better than its
    one-step output G(z) = D(80 z, 80) and than noise; a set missing one class has class_tv near 0.1. The one-step blur
    is told apart by class_tv and the distances, whatever the classifier's confidence says."""
    x, y = dmd.load_digits()
    reference, sets = teacher_sets
    m = {name: judge.metrics(images, None, reference) for name, images in [('data', x), *sets.items()]}
    assert m['data']['fd_data'] < 1e-6 and m['data']['class_tv'] < 0.01 and m['data']['confident'] > 0.95
    for good in ('data', 'heun18'):
        assert m[good]['fd_data'] < m['heun4']['fd_data'] / 2 and m[good]['fd_teacher'] < m['heun4']['fd_teacher']
    for bad in ('one_step', 'noise'):
        assert m['heun4']['fd_data'] < m[bad]['fd_data'] / 2 and m['heun4']['fd_teacher'] < m[bad]['fd_teacher'] / 2
        assert m['heun18']['class_tv'] < m[bad]['class_tv'] - 0.1
    assert abs(judge.metrics(x[y != 3])['class_tv'] - 0.1) < 0.01      # 0.1: class 3's share of the data
    labels = torch.randint(10, (1797,), generator=torch.Generator().manual_seed(0))
    assert judge.metrics(x, y)['label_acc'] > 0.97 and judge.metrics(x, labels)['label_acc'] < 0.2

def test_the_teacher_on_a_short_schedule_draws_digits_of_every_class(judge, teacher_sets):
    """The tests' teacher: its Heun samples are read as digits of every class near the data's frequencies, while its
    one-step output is not."""
    heun, one = [judge.metrics(teacher_sets[1][k]) for k in ('heun18', 'one_step')]
    assert heun['class_tv'] < 0.12 and heun['fd_data'] < 5, heun
    assert one['class_tv'] > 0.4 and one['fd_data'] > 20, one

@pytest.mark.parametrize('script', SCRIPTS)
def test_a_short_digits_run_beats_the_teachers_one_step_output(script, tmp_path, monkeypatch, digits_teacher):
    """20 generator steps (consistency.py: 10 of its batch 128) on the digits with the tests' teacher: the final
    evaluation is nearer the teacher's Heun samples than kimg 0 (the untrained student: the teacher's one-step output),
    1000 samples each. Measured over seeds 0-2, fd_teacher's ratio final / kimg 0 was 0.72-0.74 (dmd), 0.63-0.67
    (dibregman, sid), 0.87-0.90 (gan_only), 0.89-0.90 (consistency), and class_tv fell by 0.09-0.23: the test asks for
    a ratio under 0.95 and a fall over 0.05. It also checks the run's files: the grid, the animation, the .npz."""
    rows = digits_rows(script, tmp_path / 'r', monkeypatch, '--kimg', 1.28, '--eval-every', 1.28, '--fid-samples', 1000,
                       '--fid-final', 1000, *(['--reg-pairs', 128] if script == 'dmd' else []))
    first, last = rows[0], rows[-1]
    assert first['kimg'] == 0 and last['final'] and last['samples'] == 1000
    assert last['fd_teacher'] < 0.95 * first['fd_teacher'] and last['class_tv'] < first['class_tv'] - 0.05, (first, last)
    arr = np.load(tmp_path / 'r' / 'samples_1.28kimg.npz')['arr_0']
    assert arr.shape == (1000, 8, 8, 1) and arr.dtype == np.uint8
    assert (tmp_path / 'r' / 'training.gif').exists() and (tmp_path / 'r' / 'samples.png').exists()

def test_cond_digits_score_the_labels_and_save_them(tmp_path, monkeypatch):
    """--cond on the digits (a random class-conditional teacher stands in for the trained one): the rows hold label_acc,
    the saved samples their labels (arr_1), as CIFAR-10's evaluator expects."""
    def random_teacher(cond=False):
        torch.manual_seed(0)
        return dmd.EDMPrecond(label_dim=10 * cond, **dmd.DIGITS_UNET)
    monkeypatch.setattr(dmd, 'digits_teacher', random_teacher)
    dmd.train(dmd.get_config(['--data', 'digits', '--cond', '--kimg', '0.128', '--eval-every', '0.128', '--reg-pairs',
                              '16', '--fid-samples', '200', '--fid-final', '300', '--out', str(tmp_path / 'r')]))
    rows = [json.loads(line) for line in open(tmp_path / 'r' / 'metrics.jsonl')]
    assert all(0 <= r['label_acc'] <= 1 for r in rows) and rows[-1]['samples'] == 300
    npz = np.load(tmp_path / 'r' / 'samples_0.128kimg.npz')
    assert npz['arr_0'].shape == (300, 8, 8, 1) and npz['arr_1'].shape == (300,) and set(npz['arr_1']) <= set(range(10))
