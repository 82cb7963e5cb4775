"""experiments/benchmark.py: its statistics over repetitions and its JSON.

Nothing here is timed against a threshold: the step times of a loaded test
machine say nothing; what is checked is how the figures are derived and
reported.
"""

import json
import sys

from absl import flags
import pytest

from experiments import benchmark


def test_summarize_reps_takes_the_median_and_range_over_repetitions():
  # Three repetitions of 3 steps of 100 images; each repetition's figure is
  # 100 / its median step.
  jax_times = [[0.5, 0.2, 0.3], [0.25, 0.25, 0.9], [0.1, 0.2, 0.2]]
  torch_times = [[0.2, 0.2, 0.2], [0.5, 0.4, 0.5], [0.4, 0.1, 0.4]]
  r = benchmark.summarize_reps(100, jax_times, torch_times)
  assert r['images_per_sec']['reps'] == pytest.approx([333.333, 400, 500],
                                                      rel=1e-5)
  assert r['images_per_sec']['median'] == pytest.approx(400)
  assert r['images_per_sec']['min'] == pytest.approx(333.333, rel=1e-5)
  assert r['images_per_sec']['max'] == pytest.approx(500)
  assert r['range_vs_median'] == pytest.approx([1 / 1.2 - 1, 0.25])
  assert r['step_ms'] == pytest.approx(250)  # median of 300, 250, 200 ms
  assert r['torch_images_per_sec']['reps'] == pytest.approx([500, 200, 250])
  # The ratio is taken per repetition (same load), then its median.
  assert r['vs_torch']['reps'] == pytest.approx([2 / 3, 2, 2])
  assert r['vs_torch']['median'] == pytest.approx(2)
  assert r['vs_torch']['min'] == pytest.approx(2 / 3)
  assert r['reps'] == 3
  assert 'vs_torch' not in benchmark.summarize_reps(100, jax_times)


def _run_benchmark(tmp_path, *extra):
  path = tmp_path / 'bench.json'
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['benchmark', '--sizes=tiny', '--norms=bn,gn+ws', '--steps=1',
               '--warmup=0', '--reps=3', '--input=false', f'--json={path}',
               *extra])
  try:
    benchmark.main(None)
  finally:
    flags.FLAGS.unparse_flags()
  return json.loads(path.read_text())


@pytest.mark.slow
def test_benchmark_reports_every_repetition_in_its_json(tmp_path, capsys):
  torch_python = []
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    torch_python = [f'--torch_python={sys.executable}']
  except ImportError:
    pass  # PyTorch is not a dependency: the JAX half is checked alone
  results = _run_benchmark(tmp_path, *torch_python)
  assert results['reps'] == 3 and results['steps'] == 1
  # The machine is named: figures from two machines are not compared.
  assert results['cpu_model'] == benchmark.cpu_model() != ''
  row = results['sizes']['tiny']
  assert set(row) == {'bn', 'gn+ws'}
  for name, r in row.items():
    ips = r['images_per_sec']
    assert len(ips['reps']) == 3
    assert ips['min'] <= ips['median'] <= ips['max']
    assert ips['median'] == sorted(ips['reps'])[1]
    assert r['range_vs_median'][0] <= 0 <= r['range_vs_median'][1]
    assert r['num_devices'] >= 1 and r['compile_sec'] > 0
    if torch_python:
      assert len(r['torch_images_per_sec']['reps']) == 3
      assert r['vs_torch']['median'] == sorted(
          j / t for j, t in zip(ips['reps'],
                                r['torch_images_per_sec']['reps']))[1]
  assert row['bn']['step_time_vs_bn'] == 1.0
  table = capsys.readouterr().out
  # The table gives each variant's median and range.
  assert '| tiny | gn+ws | 16 |' in table
  assert f'{row["gn+ws"]["images_per_sec"]["median"]:.1f} (' in table
