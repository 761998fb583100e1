/*
 * A small persistent pthread pool. torch wheels ship their own OpenMP runtime; loading a second
 * one mis-sizes pools or hangs, so lampe owns its threads. Workers block on a condition variable
 * between jobs; one job runs at a time, and a caller that finds the pool busy (another Python
 * thread inside a kernel) runs its job alone rather than waiting.
 */
#include <pthread.h>

#include "internal.h"

static struct {
    pthread_mutex_t lock;
    pthread_cond_t start;
    pthread_cond_t done;
    pthread_mutex_t busy;
    pthread_t threads[LAMPE_MAX_THREADS];
    int n_workers;
    unsigned long generation;
    lampe_task_fn fn;
    void *ctx;
    int nthreads;  /* participants of the current job, caller included */
    int remaining; /* participating workers still running */
    unsigned long born[LAMPE_MAX_THREADS]; /* generation when each worker was created */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_MUTEX_INITIALIZER};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

/* A forked child has none of the parent's workers: start from an empty pool. */
static void after_fork_child(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.start, NULL);
    pthread_cond_init(&pool.done, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pool.n_workers = 0;
    pool.generation = 0;
}

static void register_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

static void *worker(void *arg)
{
    const int tid = (int)(intptr_t)arg;
    unsigned long seen = 0;
    pthread_mutex_lock(&pool.lock);
    seen = pool.born[tid];
    for (;;) {
        while (pool.generation == seen) pthread_cond_wait(&pool.start, &pool.lock);
        seen = pool.generation;
        if (tid >= pool.nthreads) continue;
        lampe_task_fn fn = pool.fn;
        void *ctx = pool.ctx;
        const int n = pool.nthreads;
        pthread_mutex_unlock(&pool.lock);
        fn(ctx, tid, n);
        pthread_mutex_lock(&pool.lock);
        if (--pool.remaining == 0) pthread_cond_signal(&pool.done);
    }
    return NULL;
}

void lampe_parallel_run(int nthreads, lampe_task_fn fn, void *ctx)
{
    if (nthreads > LAMPE_MAX_THREADS) nthreads = LAMPE_MAX_THREADS;
    if (nthreads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(ctx, 0, 1);
        return;
    }
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&pool.lock);
    while (pool.n_workers < nthreads - 1) {
        const int tid = pool.n_workers + 1;
        pool.born[tid] = pool.generation; /* so the job posted below is not missed */
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&pool.threads[pool.n_workers], &attr, worker, (void *)(intptr_t)tid);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.n_workers++;
    }
    if (nthreads - 1 > pool.n_workers) nthreads = pool.n_workers + 1;
    pool.fn = fn;
    pool.ctx = ctx;
    pool.nthreads = nthreads;
    pool.remaining = nthreads - 1;
    pool.generation++;
    pthread_cond_broadcast(&pool.start);
    pthread_mutex_unlock(&pool.lock);

    fn(ctx, 0, nthreads);

    pthread_mutex_lock(&pool.lock);
    while (pool.remaining > 0) pthread_cond_wait(&pool.done, &pool.lock);
    pthread_mutex_unlock(&pool.lock);
    pthread_mutex_unlock(&pool.busy);
}
