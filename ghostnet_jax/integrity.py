"""Checkpoint integrity: a checksum of every file of a step, and its check.

Each orbax step directory (``checkpoints/<step>/`` of a train.py workdir, or
``0/`` of a converted checkpoint) gets a manifest :data:`MANIFEST_NAME`: the
size and checksum of every other file under it (array data, orbax metadata,
the meta JSON). Checksums are zlib's CRC-32 (standard library, about 1 GB/s
here: verification costs little next to reading the bytes); the manifest
names the algorithm it used.

When it is written:

* async saves: from orbax's ``post_finalization_callback``, on the primary
  process, after every process has written its files and *before* orbax
  renames ``<step>.orbax-checkpoint-tmp*`` to ``<step>``; so the manifest
  is committed with the step, atomically;
* synchronous saves and converted checkpoints: right after the commit. A
  step committed without its manifest (a crash in between) does not count
  as committed: resume sets it aside.

When it is checked (:func:`verify_step`), before any byte is used: resume
(:func:`select_resume_step`), :func:`ghostnet_jax.checkpoint.restore_workdir`
(``eval.py``), and ``init_from`` / :func:`restore_converted`. Resume falls
back to the newest intact step; the steps that fail are moved, not deleted,
to ``workdir/checkpoints_aside/``. A workdir written before manifests
existed (no step has one) is used unverified, with a note.

``python -m ghostnet_jax.integrity DIR`` verifies every step under a
checkpoint directory and prints the bytes/s it read.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib

MANIFEST_NAME = '_INTEGRITY_MANIFEST.json'
# JSON files orbax updates when it commits the step (after the manifest is
# written): they are checksummed as canonical JSON without these keys.
MUTABLE_JSON = {'_CHECKPOINT_METADATA': ('commit_timestamp_nsecs',)}
ASIDE_DIR = 'checkpoints_aside'
TMP_MARK = '.orbax-checkpoint-tmp'
_CHUNK = 4 << 20

class CheckpointIntegrityError(ValueError):
  """A checkpoint file does not match its manifest; names the file."""

  def __init__(self, message: str, path: str | None = None):
    super().__init__(message)
    self.path = path


def default_algorithm() -> str:
  return 'crc32'


def file_checksum(path: str, algorithm: str) -> str:
  """Hex checksum of a file, streamed in 4 MiB chunks."""
  with open(path, 'rb') as f:
    if algorithm == 'crc32':
      crc = 0
      while chunk := f.read(_CHUNK):
        crc = zlib.crc32(chunk, crc)
      return f'{crc:08x}'
  raise CheckpointIntegrityError(f'unknown checksum algorithm {algorithm!r}.')


def _checksum_bytes(data: bytes, algorithm: str) -> str:
  if algorithm == 'crc32':
    return f'{zlib.crc32(data):08x}'
  raise CheckpointIntegrityError(f'cannot compute {algorithm!r} here.')


def _canonical_json(path: str, drop: tuple[str, ...]) -> bytes:
  """``path``'s JSON without the keys ``drop``, canonically serialised.

  Raises:
    CheckpointIntegrityError: not valid JSON (e.g. a flipped byte).
  """
  try:
    with open(path, 'rb') as f:
      obj = json.loads(f.read())
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointIntegrityError(
        f'{path} is corrupted: not valid JSON ({e}).', path) from None
  if isinstance(obj, dict):
    obj = {k: v for k, v in obj.items() if k not in drop}
  return json.dumps(obj, sort_keys=True).encode()


def _entry(step_dir: str, rel: str, algorithm: str) -> dict:
  """The manifest entry of one file: size and checksum, or for a
  :data:`MUTABLE_JSON` file the checksum of its canonical form."""
  p = os.path.join(step_dir, rel)
  if rel in MUTABLE_JSON:
    return {'canonical_json_checksum': _checksum_bytes(
        _canonical_json(p, MUTABLE_JSON[rel]), algorithm)}
  return {'size': os.path.getsize(p), 'checksum': file_checksum(p, algorithm)}


def _files(step_dir: str) -> list[str]:
  """Relative paths of every file under ``step_dir`` but the manifest."""
  out = []
  for dirpath, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(dirpath, name), step_dir)
      if rel != MANIFEST_NAME:
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str, algorithm: str | None = None) -> dict:
  """Checksums every file of ``step_dir`` into its manifest (atomically).

  Returns:
    The manifest: ``{'algorithm', 'files': {relpath: {'size', 'checksum'}}}``.
  """
  algorithm = algorithm or default_algorithm()
  files = {}
  for rel in _files(step_dir):
    try:
      files[rel] = _entry(step_dir, rel, algorithm)
    except CheckpointIntegrityError:
      if rel not in MUTABLE_JSON:
        raise
      # Orbax writes its step metadata from a background thread and again at
      # the commit: one not yet complete when an async save is sealed is left
      # out of the manifest (the arrays and the meta JSON are what matter).
  manifest = {'version': 1, 'algorithm': algorithm, 'files': files}
  target = os.path.join(step_dir, MANIFEST_NAME)
  tmp = target + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)
  return manifest


def has_manifest(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, MANIFEST_NAME))


def verify_step(step_dir: str) -> int:
  """Checks every file of ``step_dir`` against its manifest.

  Returns:
    The bytes read.

  Raises:
    CheckpointIntegrityError: a file missing, resized or with another
      checksum, or an unreadable manifest; the message names the file.
    FileNotFoundError: no manifest.
  """
  mpath = os.path.join(step_dir, MANIFEST_NAME)
  with open(mpath) as f:
    try:
      manifest = json.load(f)
      files, algorithm = manifest['files'], manifest['algorithm']
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointIntegrityError(
          f'{mpath}: unreadable integrity manifest ({e}).', mpath) from None
  total = 0
  for rel, want in sorted(files.items()):
    p = os.path.join(step_dir, rel)
    if not os.path.isfile(p):
      raise CheckpointIntegrityError(f'{p} is missing (listed in {mpath}).', p)
    size = os.path.getsize(p)
    if 'canonical_json_checksum' in want:
      got = _entry(step_dir, rel, algorithm)['canonical_json_checksum']
      if got != want['canonical_json_checksum']:
        raise CheckpointIntegrityError(
            f'{p} is corrupted: its content changed since it was saved '
            f'({algorithm} of its JSON {got}, {want["canonical_json_checksum"]}'
            ' when saved).', p)
      total += size
      continue
    if size != want['size']:
      raise CheckpointIntegrityError(
          f'{p} has {size} bytes, {want["size"]} when saved.', p)
    got = file_checksum(p, algorithm)
    if got != want['checksum']:
      raise CheckpointIntegrityError(
          f'{p} is corrupted: {algorithm} {got}, {want["checksum"]} when '
          'saved.', p)
    total += size
  return total


def committed_steps(ckpt_dir: str) -> list[int]:
  """Step numbers of the committed step directories, ascending."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir)
                if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n)))


def check_step(ckpt_dir: str, step: int) -> str | None:
  """Why step ``step`` of ``ckpt_dir`` cannot be used, or None if it can.

  A step without a manifest is usable only in a directory where no step has
  one (written before manifests existed).
  """
  step_dir = os.path.join(ckpt_dir, str(step))
  if not has_manifest(step_dir):
    sealed = [s for s in committed_steps(ckpt_dir)
              if has_manifest(os.path.join(ckpt_dir, str(s)))]
    if sealed:
      return (f'{step_dir} has no integrity manifest (its save did not '
              'finish)')
    return None
  try:
    verify_step(step_dir)
  except (CheckpointIntegrityError, OSError) as e:
    return str(e)
  return None


def intact_steps(ckpt_dir: str) -> list[int]:
  return [s for s in committed_steps(ckpt_dir) if check_step(ckpt_dir, s)
          is None]


def set_aside(ckpt_dir: str, step: int, reason: str) -> str:
  """Moves step ``step`` to ``<workdir>/checkpoints_aside/`` (not deleted)."""
  workdir = os.path.dirname(os.path.abspath(ckpt_dir))
  aside = os.path.join(workdir, ASIDE_DIR)
  os.makedirs(aside, exist_ok=True)
  target = os.path.join(aside, f'{step}.{time.strftime("%Y%m%dT%H%M%S")}')
  n = 0
  while os.path.exists(target + (f'.{n}' if n else '')):
    n += 1
  target += f'.{n}' if n else ''
  os.rename(os.path.join(ckpt_dir, str(step)), target)
  with open(target + '.reason.txt', 'w') as f:
    f.write(reason + '\n')
  return target


def select_resume_step(ckpt_dir: str, log=print) -> int | None:
  """The newest intact step; newer steps that fail are set aside, with a
  warning naming each. Call on process 0, before any checkpoint manager
  opens ``ckpt_dir``.

  Returns:
    The step to resume from, or None if none is intact (or none exists).
  """
  steps = committed_steps(ckpt_dir)
  if steps and not any(has_manifest(os.path.join(ckpt_dir, str(s)))
                       for s in steps):
    log(f'note: the checkpoints in {ckpt_dir} predate integrity manifests; '
        'they are used unverified.')
    return steps[-1]
  for step in reversed(steps):
    reason = check_step(ckpt_dir, step)
    if reason is None:
      return step
    moved = set_aside(ckpt_dir, step, reason)
    log(f'warning: checkpoint step {step} failed its integrity check and is '
        f'not used: {reason}. It was moved to {moved}; resuming from the '
        'newest intact step instead.')
  return None


def seal_pending(ckpt_dir: str) -> str | None:
  """Orbax's post-finalization callback: writes the manifest of the step
  being finalized, the oldest temporary step directory without one.

  Saves finalize in step order, and the next save's temporary directory may
  already exist (being written) while one finalizes: only the oldest is
  complete. Temporary directories of crashed runs are removed when the
  trainer's manager opens (``cleanup_tmp_directories``).

  Returns:
    The directory sealed, or None.
  """
  if not os.path.isdir(ckpt_dir):
    return None
  pending = []
  for name in os.listdir(ckpt_dir):
    d = os.path.join(ckpt_dir, name)
    head = name.split('.', 1)[0]
    if (TMP_MARK in name and head.isdigit() and os.path.isdir(d)
        and not has_manifest(d)):
      pending.append((int(head), d))
  if not pending:
    return None
  d = min(pending)[1]
  write_manifest(d)
  return d


def require_intact(ckpt_dir: str, step: int) -> None:
  """Raises unless step ``step`` is usable; the message names the bad file
  and the intact steps (for ``eval.py`` and :func:`restore_workdir`).

  Raises:
    CheckpointIntegrityError
  """
  reason = check_step(ckpt_dir, step)
  if reason is None:
    return
  others = [s for s in intact_steps(ckpt_dir) if s != step]
  raise CheckpointIntegrityError(
      f'checkpoint step {step} in {ckpt_dir} failed its integrity check: '
      f'{reason}. Intact steps: {others or "none"}'
      + (f' (e.g. --which {others[-1]}).' if others else '.'))


def async_options(directory, async_save: bool):
  """``CheckpointManagerOptions.async_options`` of the trainer: the manifest
  is written in orbax's post-finalization callback (primary process, in the
  temporary directory, before the commit). None for synchronous saves."""
  if not async_save:
    return None
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.abspath(os.fspath(directory))
  return ocp.AsyncOptions(
      post_finalization_callback=lambda: seal_pending(ckpt_dir))


def _sealing_manager_class():
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  class SealingCheckpointManager(ocp.CheckpointManager):
    """An orbax ``CheckpointManager`` whose synchronous saves get their
    manifest right after the commit (async ones get it from
    :func:`async_options`)."""

    def save(self, step, *args, **kwargs):
      saved = super().save(step, *args, **kwargs)
      if (saved and not self._options.enable_async_checkpointing
          and jax.process_index() == 0):
        write_manifest(os.path.join(str(self.directory), str(step)))
      return saved

  return SealingCheckpointManager


def __getattr__(name):
  if name == 'SealingCheckpointManager':
    cls = _sealing_manager_class()
    globals()[name] = cls
    return cls
  raise AttributeError(name)


def write_error_cause(exc: OSError) -> str:
  """The likely cause of a failed checkpoint write, from its errno."""
  import errno  # pylint: disable=g-import-not-at-top
  if exc.errno in (errno.ENOSPC, errno.EDQUOT):
    return 'Cause: disk full or over quota; free space.'
  if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return 'Cause: the directory is not writable; fix its permissions.'
  if exc.errno in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
    return ('Cause: a file or directory of the save appeared or vanished '
            'while it was written: another process is probably writing checkpoints '
            'into the same directory (two trainers on one workdir, or a '
            'copy/sync tool); make sure only one does.')
  return 'Cause: the OS error above.'


def after_restore_hint(first_bad_step: int, resume_step: int | None,
                       ckpt_dir: str) -> str:
  """Extra text for the NaN error when the NaN came right after a restore."""
  if resume_step is None or first_bad_step != resume_step + 1:
    return ''
  return (f' The NaN came at the first step after restoring step '
          f'{resume_step}: that checkpoint itself may be bad (bit rot, a bad '
          f'copy). Check it with `python -m ghostnet_jax.integrity {ckpt_dir}`'
          f', or move {os.path.join(ckpt_dir, str(resume_step))} aside to '
          'resume from an earlier step.')


def verify_dir(ckpt_dir: str) -> dict:
  """Verifies every committed step; ``{'bytes', 'seconds', 'bad': {...}}``."""
  t0 = time.perf_counter()
  total, bad = 0, {}
  for step in committed_steps(ckpt_dir):
    d = os.path.join(ckpt_dir, str(step))
    try:
      total += verify_step(d)
    except (CheckpointIntegrityError, OSError) as e:
      bad[step] = str(e)
  return {'bytes': total, 'seconds': time.perf_counter() - t0, 'bad': bad}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    print('usage: python -m ghostnet_jax.integrity CHECKPOINT_DIR',
          file=sys.stderr)
    return 2
  r = verify_dir(argv[0])
  mb = r['bytes'] / 1e6
  print(f'{argv[0]}: verified {mb:.1f} MB in {r["seconds"]:.3f}s '
        f'({mb / max(r["seconds"], 1e-9):.0f} MB/s, {default_algorithm()}).')
  for step, reason in sorted(r['bad'].items()):
    print(f'step {step}: {reason}')
  return 2 if r['bad'] else 0


if __name__ == '__main__':
  sys.exit(main())
