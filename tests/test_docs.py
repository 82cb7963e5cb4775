"""The commands shown in README.md and docs/*.md still parse.

Every command in a shell block or an inline code span is checked against the
code it names, without running it: the config files and variants load (through
ml_collections' config_flags, as main.py loads them), every `--config.FIELD`
override names a field and its value has the field's type, every `--flag` is
defined by the program it is given to (main.py, `python -m byol.export`,
`python -m experiments.*`, `./run.sh <verb>`), and the pages and `.py` files
the docs link or name exist. Flags are read from each program's source (its
`flags.DEFINE_*` and `add_argument` calls), so nothing heavy is imported.
"""

import ast
import functools
import glob
import os
import re
import shlex
from typing import Dict, List, NamedTuple, Optional, Tuple

from absl import app  # pylint: disable=unused-import  (defines absl's own flags)
from absl import flags
from ml_collections import config_flags
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# config_flags loads each config file with importlib's load_module.
pytestmark = pytest.mark.filterwarnings(
    'ignore:the load_module:DeprecationWarning')

# Fenced blocks in these languages hold shell commands; others (python, ...)
# are checked elsewhere (tests/test_export.py runs the export snippets).
SHELL_LANGS = ('', 'bash', 'sh', 'shell', 'console')
# Top-level config groups: a code span `training.x` names a config field.
CONFIG_GROUPS = ('model', 'data', 'training', 'distributed', 'fast', 'knn')
# A value standing for what the user fills in: DIR, N, $I, <path>.
PLACEHOLDER = re.compile(r'^(\$\w+|[A-Z][A-Z0-9_]*|<[^>]*>)$')


def doc_files() -> List[str]:
  return ['README.md'] + sorted(
      os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs',
                                                               '*.md')))


def read(path: str) -> str:
  with open(os.path.join(ROOT, path), encoding='utf-8') as f:
    return f.read()


# ---------------------------------------------------------------------------
# What the programs define


class Flag(NamedTuple):
  kind: str  # bool, string, integer, float, list, enum, config_file, ...
  choices: Optional[Tuple[str, ...]]  # literal enum / argparse choices


def _literal_strings(node) -> Optional[Tuple[str, ...]]:
  try:
    value = ast.literal_eval(node)
  except ValueError:
    return None  # e.g. dataset_lib.DATASETS: not checked
  if isinstance(value, (list, tuple)) and all(isinstance(v, str)
                                              for v in value):
    return tuple(value)
  return None


# Helpers that define flags for the program calling them -> their file.
FLAG_HELPERS = {'define_output_flags': 'experiments/study.py'}


@functools.lru_cache(maxsize=None)
def defined_flags(path: str) -> Dict[str, Flag]:
  """The absl and argparse flags that the Python file at `path` defines
  (through a `FLAG_HELPERS` call too)."""
  found = {}
  for node in ast.walk(ast.parse(read(path))):
    if not isinstance(node, ast.Call) or not node.args:
      continue
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(
        func, 'id', '')
    if name in FLAG_HELPERS and path != FLAG_HELPERS[name]:
      found.update(defined_flags(FLAG_HELPERS[name]))
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
      continue
    if name.startswith('DEFINE_'):
      kind = name[len('DEFINE_'):]
      choices = None
      if kind == 'enum' and len(node.args) > 2:
        choices = _literal_strings(node.args[2])
      found[first.value] = Flag(kind, choices)
    elif name == 'add_argument' and first.value.startswith('--'):
      keywords = {k.arg: k.value for k in node.keywords}
      action = keywords.get('action')
      store_true = (isinstance(action, ast.Constant) and
                    action.value == 'store_true')
      choices = (_literal_strings(keywords['choices'])
                 if 'choices' in keywords else None)
      found[first.value[2:]] = Flag('bool' if store_true else 'string',
                                    choices)
  return found


@functools.lru_cache(maxsize=None)
def absl_own_flags() -> frozenset:
  """Flags absl itself adds to every absl program (--helpfull, --v, ...)."""
  return frozenset(
      f.name for module, defined in flags.FLAGS.flags_by_module_dict().items()
      if module.startswith('absl.') for f in defined)


@functools.lru_cache(maxsize=None)
def run_sh_verbs() -> Dict[str, str]:
  """run.sh's verbs -> the program each runs ('pytest' for the tests)."""
  text = read('run.sh')
  verbs = {}
  for verb, body in re.findall(r'^  (\w+)\)\n(.*?)^    ;;', text,
                               re.M | re.S):
    module = re.search(r'-m ([\w.]+)', body)
    if module and module.group(1) == 'pytest':
      verbs[verb] = 'pytest'
    elif module:
      verbs[verb] = module_file(module.group(1))
    elif 'main.py' in body:
      verbs[verb] = 'main.py'
  return verbs


def module_file(module: str) -> Optional[str]:
  """The file `python -m module` runs, if it is part of this project."""
  base = module.replace('.', '/')
  for path in (base + '.py', base + '/__main__.py'):
    if os.path.isfile(os.path.join(ROOT, path)):
      return path
  return None


def pytest_markers() -> set:
  return set(re.findall(r'^\s+(\w+):', read('pytest.ini'), re.M))


# ---------------------------------------------------------------------------
# Configs


def _navigate(config, dotted: str):
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def _field_value_text(value) -> str:
  if isinstance(value, tuple):
    return '(' + ','.join(map(str, value)) + (',)' if len(value) == 1 else ')')
  return str(value)


def load_config(spec: str, overrides: List[str] = ()):
  """The config `--config=spec` with `overrides` gives, as main.py loads it.

  Raises on a missing file, an unknown variant, an unknown field or a value
  of the wrong type.
  """
  argv = ['docs', f'--config={os.path.join(ROOT, spec)}', *overrides]
  values = flags.FlagValues()
  # sys_argv: config_flags reads the overrides from it, not from sys.argv.
  config_flags.DEFINE_config_file('config', None, 'test', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  config = values['config'].value
  config.to_dict()  # config_flags defers errors to the first use
  return config


def config_spec(raw: str) -> str:
  """`configs/byol.py[:VARIANTS]` -> `configs/byol.py`: optional parts and
  placeholder variants dropped."""
  spec = re.sub(r'\[.*?(\]|$)', '', raw)
  path, _, arg = spec.partition(':')
  if not arg or any(PLACEHOLDER.match(a) for a in arg.split(',')):
    return path
  return f'{path}:{arg}'


@functools.lru_cache(maxsize=None)
def default_configs():
  return load_config('configs/byol.py'), load_config('configs/eval.py')


def check_field(dotted: str) -> Optional[str]:
  """An error if no config (pretraining or evaluation) has this field."""
  names = [dotted]
  if dotted.endswith('.*'):  # data.augmentations.view1.*: its fields
    names = [dotted[:-2]]
  elif '*' in dotted:  # model.*.norm: every component
    names = [dotted.replace('*', p)
             for p in ('encoder', 'projector', 'predictor')]
  for name in names:
    if not any(_has(c, name) for c in default_configs()):
      return f'no config field {name!r}'
  return None


def _has(config, dotted):
  try:
    _navigate(config, dotted)
    return True
  except KeyError:
    return False


# ---------------------------------------------------------------------------
# Commands


class Command(NamedTuple):
  doc: str
  text: str


def shell_lines(text: str) -> List[str]:
  """The logical lines of a shell block (backslash continuations joined)."""
  return [l for l in text.replace('\\\n', ' ').splitlines() if l.strip()]


def strip_fences(text: str) -> str:
  return re.sub(r'^```.*?^```', '', text, flags=re.M | re.S)


def commands_in(doc: str) -> List[Command]:
  """Shell-block lines and code spans of `doc` that run a program."""
  text = read(doc)
  found = []
  for lang, block in re.findall(r'^```(\w*)\n(.*?)^```', text, re.M | re.S):
    if lang in SHELL_LANGS:
      found += [Command(doc, line) for line in shell_lines(block)]
  for span in code_spans(doc):
    if re.match(r'(\./run\.sh|python3?|\S*/python3?)\s', span + ' '):
      found.append(Command(doc, span))
  return found


@functools.lru_cache(maxsize=None)
def code_spans(doc: str) -> Tuple[str, ...]:
  """Inline code spans outside fenced blocks, whitespace collapsed."""
  return tuple(' '.join(s.split()) for s in re.findall(
      r'`([^`]+)`', strip_fences(read(doc))))


def split_segments(tokens: List[str]) -> List[List[str]]:
  segments, current = [], []
  for token in tokens:
    if token in ('&&', '||', ';', '|'):
      segments.append(current)
      current = []
    else:
      current.append(token)
  return segments + [current]


def is_python(token: str) -> bool:
  return re.fullmatch(r'(\S*/)?python3?', token) is not None


def check_command(line: str) -> List[str]:
  """Every problem found in one shell line ([] when it parses)."""
  try:
    tokens = shlex.split(line, comments=True)
  except ValueError as e:
    return [f'not a shell line ({e})']
  problems = []
  for token in tokens:
    # A command inside an argument: gcloud's --command="cd ... && python ...".
    inner = token.split('=', 1)[-1]
    if ' ' in inner and re.search(r'python|run\.sh', inner):
      problems += check_command(inner)
  for segment in split_segments(tokens):
    problems += check_segment(segment)
  return problems


def check_segment(tokens: List[str]) -> List[str]:
  """Problems of the one program call in `tokens`, if there is one."""
  for i, token in enumerate(tokens):
    if token == './run.sh':
      return check_run_sh(tokens[i + 1:])
    if is_python(token) and i + 1 < len(tokens):
      rest = tokens[i + 1:]
      if rest[0] == '-m' and len(rest) > 1:
        if rest[1] == 'pytest':
          return check_pytest(rest[2:])
        if (not rest[1].startswith(('byol', 'experiments', 'configs',
                                    'tests')) or '*' in rest[1]):
          return []  # python -m venv, pip: not ours; experiments.*: a family
        path = module_file(rest[1])
        if path is None:
          return [f'no module {rest[1]} in the project']
        return check_args(path, rest[2:])
      if rest[0].endswith('.py'):
        if not os.path.isfile(os.path.join(ROOT, rest[0])):
          return [f'no script {rest[0]}']
        return check_args(rest[0], rest[1:])
      return []
  return []


def check_run_sh(args: List[str]) -> List[str]:
  verbs = run_sh_verbs()
  verb = 'main'
  if args and not args[0].startswith('-'):
    verb, args = args[0], args[1:]
  verb = verb.strip('[]')
  if verb not in verbs:
    return [f'./run.sh has no verb {verb!r} (it has {sorted(verbs)})']
  if verbs[verb] == 'pytest':
    return check_pytest(args)
  return check_args(verbs[verb], args)


def check_pytest(args: List[str]) -> List[str]:
  problems = []
  for i, arg in enumerate(args):
    if i > 0 and args[i - 1] == '-m':
      words = set(re.findall(r'\w+', arg)) - {'and', 'or', 'not'}
      problems += [f'no pytest marker {w!r}' for w in
                   sorted(words - pytest_markers())]
    elif arg.startswith('tests/'):
      if not os.path.exists(os.path.join(ROOT, arg.split('::')[0])):
        problems.append(f'no test file {arg}')
  return problems


def check_args(path: str, args: List[str]) -> List[str]:
  """Problems of the flags `args` given to the program in `path`."""
  defined = defined_flags(path)
  problems = []
  overrides, spec = [], None
  for raw in args:
    # [--heads]: an optional flag; [--config.FIELD=VALUE ...]: the same.
    arg = raw
    if arg.startswith('['):
      arg = arg[1:-1] if arg.endswith(']') else arg[1:]
    if not arg.startswith('--'):
      continue
    name, has_value, value = arg[2:].partition('=')
    if path == 'main.py' and name.startswith('config.'):
      field = name[len('config.'):]
      if PLACEHOLDER.match(field) or field == '...':
        continue
      overrides.append((field, value if has_value else None))
      continue
    flag = defined.get(name)
    if flag is None and name.startswith('no'):
      negated = defined.get(name[2:])
      flag = negated if negated and negated.kind == 'bool' else None
    if flag is None:
      if name not in absl_own_flags():
        problems.append(f'{path} has no flag --{name}')
      continue
    if flag.kind == 'config_file' and has_value:
      spec = config_spec(value)
    if flag.choices and has_value and not PLACEHOLDER.match(value):
      bad = [v for v in value.split('|') if v not in flag.choices]
      if bad:
        problems.append(f'--{name}={value}: not one of {flag.choices}')
  if path == 'main.py':
    problems += check_main_config(spec, overrides)
  return problems


def check_main_config(spec: Optional[str],
                      overrides: List[Tuple[str, Optional[str]]]) -> List[str]:
  """Loads main.py's --config with the overrides whose value is given."""
  if spec is None:
    if overrides:
      return ['--config.FIELD overrides without --config=']
    return []
  try:
    config = load_config(spec)
  except Exception as e:  # pylint: disable=broad-except
    return [f'--config={spec} does not load: {str(e).splitlines()[-1]}']
  given = []
  problems = []
  for field, value in overrides:
    try:
      current = _navigate(config, field)
    except KeyError:
      problems.append(f'{spec} has no field {field!r}')
      continue
    if value is None or PLACEHOLDER.match(value):
      value = _field_value_text(current)  # a stand-in: the field exists
    given.append(f'--config.{field}={value}')
  if not problems and given:
    try:
      load_config(spec, given)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f'{" ".join(given)}: {str(e).splitlines()[-1]}')
  return problems


# ---------------------------------------------------------------------------
# Code spans that name a field, a flag, a config or a file


def check_span(span: str) -> List[str]:
  problems = []
  for spec in re.findall(r'configs/\w+\.py(?::[\w,]+)?', span):
    spec = config_spec(spec)
    try:
      load_config(spec)
    except Exception as e:  # pylint: disable=broad-except
      problems.append(f'{spec} does not load: {str(e).splitlines()[-1]}')
  for path in re.findall(r'\b(?:byol|tests|experiments|configs)/[\w/]+\.py\b',
                         span):
    if not os.path.isfile(os.path.join(ROOT, path)):
      problems.append(f'no file {path}')
  field = re.fullmatch(
      r'(?:--config\.)?((?:%s)(?:\.[\w*]+)+)(?:=\S*)?' % '|'.join(
          CONFIG_GROUPS), span)
  if field and not re.search(r'\.(py|md|json|jsonl|png|npz)$',
                             field.group(1)):
    problems += [p for p in [check_field(field.group(1))] if p]
  elif span.startswith('--config.'):
    name = span[len('--config.'):].partition('=')[0]
    if not PLACEHOLDER.match(name):
      problems += [p for p in [check_field(name)] if p]
  elif span.startswith('--'):
    # Flags quoted apart from their command (`--probe`, `--rows=a,b`, or a
    # flag list): each must belong to some program of the project.
    known = set(absl_own_flags())
    for path in program_files():
      known |= set(defined_flags(path))
    for token in span.split():
      name = token[2:].partition('=')[0]
      if (token.startswith('--') and not name.startswith('xla_') and
          name not in known and name[2:] not in known):
        problems.append(f'no program of the project has a flag --{name}')
  return problems


def program_files() -> List[str]:
  return ['main.py', 'byol/export/__main__.py'] + sorted(
      os.path.relpath(p, ROOT)
      for p in glob.glob(os.path.join(ROOT, 'experiments', '*.py')))


def heading_anchor(heading: str) -> str:
  """GitHub's anchor of a markdown heading."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def check_links(doc: str) -> List[str]:
  problems = []
  for target in re.findall(r'\]\(([^)\s]+)\)', strip_fences(read(doc))):
    if re.match(r'\w+://', target):
      continue
    path, _, anchor = target.partition('#')
    full = os.path.normpath(os.path.join(os.path.dirname(doc), path)
                            ) if path else doc
    if not os.path.exists(os.path.join(ROOT, full)):
      problems.append(f'link to a missing {target}')
    elif anchor and full.endswith('.md'):
      anchors = {heading_anchor(h) for h in re.findall(
          r'^#+ (.*)$', strip_fences(read(full)), re.M)}
      if anchor not in anchors:
        problems.append(f'link to a missing heading {target}')
  return problems


# ---------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize('doc', doc_files())
def test_commands_parse(doc):
  """Every command of the page names existing configs, fields and flags."""
  commands = commands_in(doc)
  problems = [f'{c.doc}: {c.text}\n    {p}'
              for c in commands for p in check_command(c.text)]
  assert not problems, '\n'.join(problems)


@pytest.mark.parametrize('doc', doc_files())
def test_spans_and_links_exist(doc):
  """Fields, flags, configs and files named in code spans, and links."""
  problems = [f'{doc}: `{s}`: {p}' for s in code_spans(doc)
              for p in check_span(s)]
  problems += [f'{doc}: {p}' for p in check_links(doc)]
  assert not problems, '\n'.join(problems)


def test_docs_show_the_commands():
  """The README gives the two commands, and every page has commands or is
  linked from the README (so that nothing is an orphan)."""
  readme = read('README.md')
  assert './run.sh test' in readme and '\n./run.sh ' in readme
  for doc in doc_files()[1:]:
    assert f'({doc})' in readme, f'README.md does not link {doc}'
  assert sum(len(commands_in(d)) for d in doc_files()) > 50


# A planted bad command of each kind is caught: the checks can fail.
@pytest.mark.parametrize('line, problem', [
    ('python main.py --config=configs/byol.py:local --workdir=w --probee',
     'main.py has no flag --probee'),
    ('python main.py --config=configs/byol.py:local --workdir=w '
     '--config.training.batch_sise=8', "has no field 'training.batch_sise'"),
    ('python main.py --config=configs/byol.py:local --workdir=w '
     '--config.training.batch_size=many', 'training.batch_size=many'),
    ('python main.py --config=configs/byol.py:lokal --workdir=w',
     'does not load'),
    ('python main.py --config=configs/nope.py --workdir=w', 'does not load'),
    ('python -m experiments.ablation --rows=byol_gnws --fulll',
     'experiments/ablation.py has no flag --fulll'),
    ('python -m experiments.nothing --x=1', 'no module experiments.nothing'),
    ('python -m byol.export --workdir=w --format=all --outt=e',
     'byol/export/__main__.py has no flag --outt'),
    ('python -m experiments.benchmark --dtype=float16', 'not one of'),
    ('./run.sh ablate', "./run.sh has no verb 'ablate'"),
    ('./run.sh ablation --ful', 'experiments/ablation.py has no flag --ful'),
    ('./run.sh test -m "not slo"', "no pytest marker 'slo'"),
    ('gcloud x --command="cd d && .venv/bin/python main.py '
     '--config=configs/byol.py --config.distributed.autoo=True"',
     "has no field 'distributed.autoo'"),
])
def test_planted_bad_commands_fail(line, problem):
  problems = check_command(line)
  assert any(problem in p for p in problems), problems


@pytest.mark.parametrize('span, problem', [
    ('training.predictor_lr_multiplierr', 'no config field'),
    ('--config.model.encoder.nrom=bn', 'no config field'),
    ('--torch_pyhton', 'no program of the project has a flag'),
    ('configs/byol.py:lcoal', 'does not load'),
    ('byol/no_such_module.py', 'no file'),
])
def test_planted_bad_spans_fail(span, problem):
  problems = check_span(span)
  assert any(problem in p for p in problems), problems


def test_good_commands_pass():
  """The checker accepts real commands of every kind (no false alarms)."""
  for line in [
      'python main.py --config=configs/byol.py:local,bn --workdir=w '
      '--config.training.batch_size=128 --config.distributed.process_id=$I',
      'python main.py --config=configs/eval.py:local,fast --workdir=w '
      '--config.encoder=target --config.training.lr_grid=(0.1,0.2)',
      './run.sh ablation --full', './run.sh test -m "not slow"',
      'python -m experiments.benchmark --dtype=bfloat16|float32 --noinput',
      'python -m byol.export --workdir=W --format=all --out=DIR [--heads]',
  ]:
    assert check_command(line) == [], line
