"""A small HTTP server on 127.0.0.1 for download tests.

Serves ``files`` (``{url path: bytes}``) with ``Range`` support and scripted
faults per path: ``fail`` (first N requests answer 503), ``truncate`` (first N
responses announce the full length but send only half, then close),
``no_range`` (ignore ``Range``). Every request is logged. Runs in a daemon
thread; ``close()`` stops it (the fixture always does).
"""

from __future__ import annotations

import http.server
import threading


class _Handler(http.server.BaseHTTPRequestHandler):
  server_version = 'weights-test'

  def log_message(self, *args):  # quiet
    del args

  def do_GET(self):  # noqa: N802  (http.server's name)
    srv = self.server
    srv.log.append((self.path, self.headers.get('Range')))
    data = srv.files.get(self.path)
    if data is None:
      self.send_error(404)
      return
    faults = srv.faults.setdefault(self.path, {})
    if faults.get('fail', 0) > 0:
      faults['fail'] -= 1
      self.send_error(503)
      return
    start = 0
    rng = self.headers.get('Range')
    if rng and not faults.get('no_range'):
      start = int(rng.split('=')[1].split('-')[0])
      if start >= len(data):
        self.send_error(416)
        return
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
    else:
      self.send_response(200)
    body = data[start:]
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if faults.get('truncate', 0) > 0:
      faults['truncate'] -= 1
      self.wfile.write(body[:len(body) // 2])
      self.wfile.flush()
      self.close_connection = True
      return
    self.wfile.write(body)


class WeightsServer:
  """``WeightsServer().url(path)``; ``files``, ``faults``, ``log`` are live."""

  def __init__(self):
    self._httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    self._httpd.files, self._httpd.faults, self._httpd.log = {}, {}, []
    self._httpd.daemon_threads = True
    self._thread = threading.Thread(target=self._httpd.serve_forever,
                                    kwargs={'poll_interval': 0.05},
                                    daemon=True)
    self._thread.start()

  @property
  def files(self):
    return self._httpd.files

  @property
  def faults(self):
    return self._httpd.faults

  @property
  def log(self):
    return self._httpd.log

  def url(self, path: str) -> str:
    host, port = self._httpd.server_address[:2]
    return f'http://{host}:{port}{path}'

  def close(self):
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join(timeout=5)
