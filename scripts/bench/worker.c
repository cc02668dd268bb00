/* Anchor for scripts/bench-gearman: a plain libgearman worker serving `reverse`, written the
 * way the libgearman examples do it. One connection, one job at a time.
 * Usage: worker HOST PORT */
#include <libgearman/gearman.h>
#include <stdio.h>
#include <stdlib.h>

static void *reverse(gearman_job_st *job, void *context, size_t *result_size, gearman_return_t *ret) {
  (void)context;
  size_t n = gearman_job_workload_size(job);
  const char *in = gearman_job_workload(job);
  char *out = malloc(n ? n : 1);
  if (out == NULL) {
    *ret = GEARMAN_WORK_FAIL;
    return NULL;
  }
  for (size_t i = 0; i < n; i++) out[i] = in[n - 1 - i];
  *result_size = n;
  *ret = GEARMAN_SUCCESS;
  return out; /* libgearman frees it */
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s HOST PORT\n", argv[0]);
    return 2;
  }
  gearman_worker_st *w = gearman_worker_create(NULL);
  if (w == NULL || gearman_worker_add_server(w, argv[1], (in_port_t)atoi(argv[2])) != GEARMAN_SUCCESS ||
      gearman_worker_add_function(w, "reverse", 0, reverse, NULL) != GEARMAN_SUCCESS) {
    fprintf(stderr, "cannot set up the worker\n");
    return 1;
  }
  for (;;) {
    gearman_return_t rc = gearman_worker_work(w);
    if (rc != GEARMAN_SUCCESS) fprintf(stderr, "worker: %s\n", gearman_worker_error(w));
  }
}
