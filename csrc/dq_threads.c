/* Allocation helpers and the core's small parallel-for (plain pthreads). */
#include "dq_common.h"
#include "dq_blas.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

void *dq_malloc(size_t bytes)
{
    void *p = NULL;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, bytes) != 0) return NULL;
    return p;
}

void *dq_calloc(size_t bytes)
{
    void *p = dq_malloc(bytes);
    if (p) memset(p, 0, bytes ? bytes : 64);
    return p;
}

void dq_free(void *p) { free(p); }

int dq_num_threads(void)
{
    const char *env = getenv("DECOUPLEQ_NUM_THREADS");
    if (env && *env) {
        int n = atoi(env);
        if (n >= 1) return n > 256 ? 256 : n;
    }
    int n = dq_openblas_get_num_threads();
    return n >= 1 ? n : 1;
}

typedef struct {
    dq_range_fn fn;
    void *ctx;
    int64_t begin, end;
} chunk_t;

static void *run_chunk(void *arg)
{
    chunk_t *c = (chunk_t *)arg;
    c->fn(c->ctx, c->begin, c->end);
    return NULL;
}

dq_status dq_parallel_for(int64_t n, int64_t min_chunk, int nthreads, dq_range_fn fn, void *ctx)
{
    if (n <= 0) return DQ_OK;
    if (min_chunk < 1) min_chunk = 1;
    int64_t max_by_size = (n + min_chunk - 1) / min_chunk;
    int t = nthreads < 1 ? 1 : nthreads;
    if (t > max_by_size) t = (int)max_by_size;
    if (t <= 1) {
        fn(ctx, 0, n);
        return DQ_OK;
    }
    chunk_t chunks[256];
    pthread_t threads[256];
    int joined[256];
    if (t > 256) t = 256;
    for (int i = 0; i < t; i++) {
        chunks[i].fn = fn;
        chunks[i].ctx = ctx;
        chunks[i].begin = n * i / t;
        chunks[i].end = n * (i + 1) / t;
    }
    /* Chunk 0 runs on the calling thread; the others on new threads.  A
     * failed pthread_create falls back to running that chunk here. */
    for (int i = 1; i < t; i++) {
        joined[i] = pthread_create(&threads[i], NULL, run_chunk, &chunks[i]) == 0;
        if (!joined[i]) run_chunk(&chunks[i]);
    }
    run_chunk(&chunks[0]);
    for (int i = 1; i < t; i++)
        if (joined[i]) pthread_join(threads[i], NULL);
    return DQ_OK;
}
