/* Reference client for the benchmark: native libnbd (C), one handle per connection, a fixed
 * number of aio reads in flight, reading a list of 64 KiB blocks (adjacent ones coalesced).
 * usage: sparse_read URI BLOCKLIST CONNS INFLIGHT */
#include <libnbd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#define BS 65536
struct run { uint64_t off; uint32_t len; };
static struct run *runs; static size_t nruns; static const char *uri; static int conns, inflight;
static uint64_t total;
struct w { int idx; uint64_t bytes; };
static int done_cb (void *user_data, int *error) { if (*error) { fprintf (stderr, "read error %d\n", *error); exit (1); } free (user_data); return 1; }
static void *worker (void *arg) {
  struct w *w = arg; struct nbd_handle *h = nbd_create ();
  if (!h || nbd_set_uri_allow_local_file (h, true) == -1 || nbd_connect_uri (h, uri) == -1) { fprintf (stderr, "%s\n", nbd_get_error ()); exit (1); }
  size_t i = w->idx;
  while (i < nruns || nbd_aio_in_flight (h) > 0) {
    while (i < nruns && nbd_aio_in_flight (h) < inflight) {
      void *buf = malloc (runs[i].len);
      if (nbd_aio_pread (h, buf, runs[i].len, runs[i].off, (nbd_completion_callback) { .callback = done_cb, .user_data = buf }, 0) == -1) { fprintf (stderr, "%s\n", nbd_get_error ()); exit (1); }
      w->bytes += runs[i].len; i += conns;
    }
    if (nbd_poll (h, -1) == -1) { fprintf (stderr, "%s\n", nbd_get_error ()); exit (1); }
  }
  nbd_shutdown (h, 0); nbd_close (h); return NULL;
}
int main (int argc, char **argv) {
  uri = argv[1]; conns = atoi (argv[3]); inflight = atoi (argv[4]);
  FILE *f = fopen (argv[2], "r"); long b, s = -1, p = -2; runs = malloc (sizeof *runs * 70000);
  while (fscanf (f, "%ld", &b) == 1) {
    if (b == p + 1 && p - s + 1 < 512) { p = b; continue; }
    if (s >= 0) { runs[nruns].off = (uint64_t) s * BS; runs[nruns].len = (p - s + 1) * BS; total += runs[nruns++].len; }
    s = p = b;
  }
  runs[nruns].off = (uint64_t) s * BS; runs[nruns].len = (p - s + 1) * BS; total += runs[nruns++].len;
  struct timespec t0, t1; clock_gettime (CLOCK_MONOTONIC, &t0);
  pthread_t th[64]; struct w ws[64];
  for (int k = 0; k < conns; k++) { ws[k] = (struct w) { k, 0 }; pthread_create (&th[k], NULL, worker, &ws[k]); }
  uint64_t got = 0; for (int k = 0; k < conns; k++) { pthread_join (th[k], NULL); got += ws[k].bytes; }
  clock_gettime (CLOCK_MONOTONIC, &t1);
  double secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  fprintf (stderr, "requests=%zu bytes=%lu secs=%.3f MB/s=%.0f\n", nruns, (unsigned long) got, secs, got / secs / 1e6);
  return got == total ? 0 : 1;
}
