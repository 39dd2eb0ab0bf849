/* Allocation helpers and the core's parallel-for: a persistent pthread pool. */
#include "dq_common.h"
#include "dq_blas.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    /* The user's BLAS count, not OpenBLAS's own: a dq_sgemm_rows section
     * holds that at 1 meanwhile. */
    return dq_blas_threads();
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

#define MAX_THREADS 256
#define JOB_SPAN 512 /* > MAX_THREADS */

/* Threads created per call: the fallback when the pool is in use (another
 * Python thread, or a parallel_for nested inside a worker) or cannot grow. */
static void spawn_and_run(chunk_t *chunks, int t)
{
    pthread_t threads[MAX_THREADS];
    int joined[MAX_THREADS];
    /* Chunk 0 runs on the calling thread; a failed pthread_create runs its
     * chunk here too. */
    for (int i = 1; i < t; i++) {
        joined[i] = pthread_create(&threads[i], NULL, run_chunk, &chunks[i]) == 0;
        if (!joined[i]) run_chunk(&chunks[i]);
    }
    run_chunk(&chunks[0]);
    for (int i = 1; i < t; i++)
        if (joined[i]) pthread_join(threads[i], NULL);
}

/* ---- persistent pool ------------------------------------------------------
 * Creating threads on every call cost more than a small layer's whole GEMV
 * (tens of microseconds per thread), so workers live for the process and
 * wait between calls.  One caller at a time owns the pool (`busy`, taken by
 * trylock: a second caller never waits, it spawns its own threads).  Worker
 * i runs chunk i of the current generation; chunk 0 runs on the caller.
 * After a job a worker spins briefly before sleeping, since a decoder calls
 * layer after layer within microseconds. */
typedef struct {
    pthread_mutex_t busy;
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    int nworkers;                /* started: they serve chunks 1..nworkers */
    /* generation * JOB_SPAN + chunks in it, in one word so a worker never
     * pairs one generation with another's chunk count. */
    _Atomic uint64_t job;
    uint64_t start_job;          /* the job value a new worker starts from */
    _Atomic int remaining;       /* worker chunks of the generation not yet done */
    chunk_t chunks[MAX_THREADS];
    pid_t pid;                   /* the process the workers belong to */
} pool_t;

static pool_t pool = {
    .busy = PTHREAD_MUTEX_INITIALIZER,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .done = PTHREAD_COND_INITIALIZER,
};
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int pool_disabled;

/* Pause iterations a waiting thread spins before it sleeps (a few us):
 * short, because on a machine with more runnable threads than cores a
 * spinning worker takes time from the threads doing the work. */
#define SPIN_ITERS 300

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* In a child after fork the workers do not exist and the mutexes may have
 * been held by parent threads that are gone: start over. */
static void pool_reset(void)
{
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.nworkers = 0;
    atomic_store(&pool.job, 0);
    atomic_store(&pool.remaining, 0);
    pool.pid = getpid();
}

static void pool_init_once(void)
{
    const char *env = getenv("DECOUPLEQ_THREAD_POOL");
    pool_disabled = env && env[0] == '0' && env[1] == '\0';
    pool.pid = getpid();
    pthread_atfork(NULL, NULL, pool_reset);
}

static void *worker_main(void *arg)
{
    int me = (int)(intptr_t)arg;
    /* Not the current value: the job that made this worker may already be
     * posted, and it must not be mistaken for an old one. */
    uint64_t seen = pool.start_job;
    for (;;) {
        int spins = 0;
        while (atomic_load(&pool.job) == seen && spins < SPIN_ITERS) {
            cpu_relax();
            spins++;
        }
        if (atomic_load(&pool.job) == seen) {
            pthread_mutex_lock(&pool.lock);
            while (atomic_load(&pool.job) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load(&pool.job);
        /* Workers beyond this generation's chunk count sit it out. */
        if (me >= (int)(seen % JOB_SPAN)) continue;
        run_chunk(&pool.chunks[me]);
        if (atomic_fetch_sub(&pool.remaining, 1) == 1) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return NULL;
}

/* Start workers until chunks 1..want-1 have one; 0 on success.  Called with
 * `busy` held. */
static int pool_grow(int want)
{
    if (pool.nworkers >= want - 1) return 0;
    sigset_t all, old;
    sigfillset(&all);
    /* Workers never take signals: CPython expects them on its own threads. */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    /* Only the owner of `busy` posts jobs, so this is the value until the
     * next post, which the new worker will serve. */
    pool.start_job = atomic_load(&pool.job);
    int ok = 1;
    while (pool.nworkers < want - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, worker_main, (void *)(intptr_t)(pool.nworkers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            ok = 0;
            break;
        }
        pool.nworkers++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return ok ? 0 : -1;
}

/* Run chunks 0..t-1 on the pool; 0 on success, -1 when the pool is busy or
 * cannot grow (nothing has run then). */
static int pool_run(const chunk_t *chunks, int t)
{
    pthread_once(&pool_once, pool_init_once);
    if (pool_disabled) return -1;
    if (pool.pid != getpid()) pool_reset(); /* fork without the atfork handler */
    if (pthread_mutex_trylock(&pool.busy) != 0) return -1;
    if (pool_grow(t) != 0) {
        pthread_mutex_unlock(&pool.busy);
        return -1;
    }
    memcpy(pool.chunks, chunks, (size_t)t * sizeof *chunks);
    atomic_store(&pool.remaining, t - 1);
    pthread_mutex_lock(&pool.lock);
    uint64_t gen = atomic_load(&pool.job) / JOB_SPAN + 1;
    atomic_store(&pool.job, gen * JOB_SPAN + (uint64_t)t);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);

    run_chunk(&pool.chunks[0]);

    int spins = 0;
    while (atomic_load(&pool.remaining) != 0 && spins < SPIN_ITERS) {
        cpu_relax();
        spins++;
    }
    if (atomic_load(&pool.remaining) != 0) {
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.remaining) != 0) pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.busy);
    return 0;
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
    if (t > MAX_THREADS) t = MAX_THREADS;
    chunk_t chunks[MAX_THREADS];
    for (int i = 0; i < t; i++) {
        chunks[i].fn = fn;
        chunks[i].ctx = ctx;
        chunks[i].begin = n * i / t;
        chunks[i].end = n * (i + 1) / t;
    }
    if (pool_run(chunks, t) != 0) spawn_and_run(chunks, t);
    return DQ_OK;
}
