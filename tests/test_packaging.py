"""The package installs from its own metadata: declared dependencies, the
wheel's contents, and (slow) a clean virtual environment running it."""

import ast
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'ghostnet_jax')
# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {'PIL': 'pillow', 'sklearn': 'scikit-learn',
                 'absl': 'absl-py', 'orbax': 'orbax-checkpoint',
                 'ml_collections': 'ml-collections',
                 'tensorflow_datasets': 'tensorflow-datasets',
                 'tensorboardX': 'tensorboardx', 'array_record': 'array-record',
                 'tensorflow': 'tensorflow-cpu'}
# Imported only where an extra is installed: torch (the converter),
# tensorflow (export; the TF checkpoint reader).
OPTIONAL = {'torch', 'tensorflow'}
SCRIPTS = ('ghostnet-train', 'ghostnet-eval', 'ghostnet-convert',
           'ghostnet-summary')


def _project():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)['project']


def _name(requirement: str) -> str:
  for stop in '<>=![; ':
    requirement = requirement.split(stop)[0]
  return requirement.strip().lower().replace('_', '-')


def _imported_top_level_modules() -> set[str]:
  names = set()
  for dirpath, _, files in os.walk(PACKAGE):
    for f in files:
      if not f.endswith('.py'):
        continue
      with open(os.path.join(dirpath, f)) as src:
        tree = ast.parse(src.read())
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          names.update(a.name.split('.')[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          names.add(node.module.split('.')[0])
  return names


def test_every_third_party_import_is_a_declared_dependency():
  stdlib = set(sys.stdlib_module_names) | {'__future__'}
  third_party = {m for m in _imported_top_level_modules()
                 if m not in stdlib and m != 'ghostnet_jax'}
  project = _project()
  declared = {_name(r) for r in project['dependencies']}
  extras = {_name(r) for reqs in project['optional-dependencies'].values()
            for r in reqs}
  for module in sorted(third_party):
    dist = DISTRIBUTIONS.get(module, module).lower().replace('_', '-')
    if module in OPTIONAL:
      assert dist in extras, f'{module}: not in any extra'
    else:
      assert dist in declared, (
          f'ghostnet_jax imports {module!r} but pyproject.toml does not '
          f'declare {dist!r}')
  for extra in ('torch', 'timm', 'test'):
    assert extra in project['optional-dependencies']
  assert set(SCRIPTS) <= set(project['scripts'])


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """A wheel built from this checkout (kernels compiled into it)."""
  out = tmp_path_factory.mktemp('wheel')
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', ROOT, '--no-deps',
                  '--no-build-isolation', '-q', '-w', str(out)],
                 check=True, timeout=900)
  (path,) = out.glob('ghostnet_jax-*.whl')
  return path


@pytest.mark.slow
def test_wheel_holds_the_package_configs_data_and_kernels(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    meta = next(n for n in names if n.endswith('.dist-info/METADATA'))
    metadata = z.read(meta).decode()
    entry = next(n for n in names if n.endswith('.dist-info/entry_points.txt'))
    entry_points = z.read(entry).decode()
  sources = {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, '/')
             for d, _, files in os.walk(PACKAGE) for f in files
             if f.endswith('.py')}
  assert sources <= names, sorted(sources - names)
  for name in ('ghostnet_jax/configs/default.py',
               'ghostnet_jax/data/imagenet_classes.tsv',
               'ghostnet_jax/kernels/depthwise.cc',
               'ghostnet_jax/kernels/_depthwise_cpu.so'):
    assert name in names, name
  assert not any(n.startswith(('tests/', 'configs/', 'benchmarks/'))
                 for n in names)
  # The kernels are native code: the wheel is tagged for this platform.
  assert 'py3-none-any' not in wheel.name
  platform = sysconfig.get_platform().replace('-', '_').replace('.', '_')
  assert wheel.name.endswith(f'{platform}.whl'), wheel.name
  for dist in ('matplotlib', 'tensorboardX', 'scikit-learn', 'absl-py'):
    assert f'Requires-Dist: {dist}' in metadata, dist
  for script in SCRIPTS:
    assert script in entry_points, script


# The clean-environment install: a new venv without this checkout's packages,
# the wheel and its declared dependencies from the package registry, held to
# the versions requirements.txt pins (pip's cache serves them after setup.sh;
# about 2-4 minutes). GHOSTNET_JAX_INSTALL_TEST=0 skips it where there is no
# registry.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('GHOSTNET_JAX_INSTALL_TEST') == '0',
                    reason='GHOSTNET_JAX_INSTALL_TEST=0 (no package registry)')
def test_wheel_installs_and_runs_in_a_clean_venv(wheel, tmp_path):
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  # Without PYTHONPATH: a checkout on it would satisfy the requirement.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  subprocess.run([python, '-m', 'pip', 'install', '-q',
                  '--disable-pip-version-check', '-c',
                  os.path.join(ROOT, 'requirements.txt'), str(wheel)],
                 check=True, timeout=1800, env=env, cwd=tmp_path)
  run = lambda *args: subprocess.run(
      [python, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
      timeout=1200)
  out = run('-m', 'ghostnet_jax.summary', 'ghostnet_050')
  assert out.returncode == 0 and 'ghostnet_050' in out.stdout, out.stderr
  out = run('-c', 'import ghostnet_jax.kernels as k; print(k.is_available())')
  assert out.stdout.strip() == 'True', out.stderr
  out = run('-m', 'ghostnet_jax.convert', '--help')
  assert out.returncode == 0, out.stderr
  out = run('-m', 'ghostnet_jax.train_cli', '--workdir', 'w',
            '--config.num_train_steps=2', '--config.eval_every_steps=0',
            '--config.checkpoint_every_steps=2', '--config.batch_size=16',
            '--config.data_dir=tfds')
  assert out.returncode == 0, out.stderr[-3000:]
  out = run('-m', 'ghostnet_jax.eval_cli', '--checkpoint', 'w',
            '--no_progress')
  assert out.returncode == 0 and 'top-1' in out.stdout, out.stderr[-3000:]


def test_readme_layout_lists_every_module_and_only_existing_ones():
  import re  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'README.md')) as f:
    text = f.read()
  section = text[text.index('## Repository layout'):]
  block = section[section.index('```\n') + 4:]
  block = block[:block.index('```')]
  named = set()
  for line in block.splitlines():
    head = re.split(r'\s{2,}', line.strip())[0]  # the names, not the note
    named.update(n for n in head.split(', ') if n.endswith(('.py', '/')))
  modules = {f for f in os.listdir(PACKAGE) if f.endswith('.py')
             and f != '__init__.py'}
  for module in modules:
    assert module in named, f'README layout lacks ghostnet_jax/{module}'
  for name in named:
    top_level = ('ghostnet_jax/', 'configs/', 'benchmarks/', 'tests/',
                 'examples/', 'train.py', 'eval.py')
    path = name if name in top_level else os.path.join('ghostnet_jax', name)
    assert os.path.exists(os.path.join(ROOT, path)), (
        f'README layout names {name}, which is not in the tree')


def _package_import_graph() -> dict[str, set[str]]:
  """``{module: package modules it imports}``, imports inside functions too."""
  import ast  # pylint: disable=g-import-not-at-top
  files = {}
  for d, _, names in os.walk(PACKAGE):
    for f in names:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3]
        module = rel.replace(os.sep, '.').removesuffix('.__init__')
        files[module] = os.path.join(d, f)

  def owner(name):  # the module that defines `name` (a module or a member)
    while name not in files:
      name = name.rpartition('.')[0]
    return name

  graph = {}
  for module, path in files.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    deps = set()
    for node in ast.walk(tree):
      if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
          and node.module.split('.')[0] == 'ghostnet_jax'):
        deps.update(owner(f'{node.module}.{a.name}') for a in node.names)
      elif isinstance(node, ast.Import):
        deps.update(owner(a.name) for a in node.names
                    if a.name.split('.')[0] == 'ghostnet_jax')
    graph[module] = deps - {module}
  return graph


def test_package_imports_have_no_cycles():
  """Imports point one way, also those deferred into functions (a deferred
  import hides a cycle from Python, not from a reader)."""
  graph = _package_import_graph()
  assert graph['ghostnet_jax.ops'] >= {'ghostnet_jax.kernels'}  # the walk works
  state = {}

  def visit(module, path):
    state[module] = 'open'
    for dep in sorted(graph[module]):
      if state.get(dep) == 'open':
        cycle = path[path.index(dep):] + [dep]
        raise AssertionError('import cycle: ' + ' -> '.join(cycle))
      if dep not in state:
        visit(dep, path + [dep])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  # Models never import the converter, the trainer or the evaluator.
  for model in ('ghostnet', 'ghostnetv2', 'ghostnetv3', 'g_ghost',
                'ghost_resnet', 'ghost_layers', 'layers', 'ops'):
    reach, todo = set(), [f'ghostnet_jax.{model}']
    while todo:
      for dep in graph[todo.pop()] - reach:
        reach.add(dep)
        todo.append(dep)
    for upper in ('convert', 'train_lib', 'eval_lib', 'loading', 'export'):
      assert f'ghostnet_jax.{upper}' not in reach, (model, upper)
