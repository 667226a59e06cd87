// A minimal real CUDA client for the GPU tests: cheap to start fifty of.
//   mps_client hold SECONDS   keep a kernel running until SECONDS pass (exit 4 on a CUDA error)
//   mps_client idle SECONDS   hold a context without running anything, then exit 0
//   mps_client fault SECONDS  write to an illegal address (Xid 31 under MPS), then linger SECONDS
//   mps_client hog SECONDS    cudaMalloc until the GPU has no memory left, print "hogged BYTES", hold
//                             it SECONDS, then free it and exit 0 (plain allocations, never managed memory)
// Prints "ready <pid>" once its context exists, or "init_failed <code> <text>" and exits 2.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__global__ void spin(long long cycles) {
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}

__global__ void write_far(int *p) { *(int *)((size_t)p + (1ull << 40)) = 1; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "hold";
    double seconds = argc > 2 ? atof(argv[2]) : 10.0;
    cudaError_t err = cudaFree(0);
    if (err != cudaSuccess) {
        printf("init_failed %d %s\n", (int)err, cudaGetErrorString(err));
        return 2;
    }
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    if (strcmp(mode, "idle") == 0) {
        usleep((useconds_t)(seconds * 1e6));
        return 0;
    }
    if (strcmp(mode, "hog") == 0) {
        size_t held = 0;
        void *p;
        for (size_t chunk = 1ull << 30; chunk >= (16ull << 20); chunk /= 2) {
            while (cudaMalloc(&p, chunk) == cudaSuccess) held += chunk;
            cudaGetLastError();  // clear the out-of-memory error; the context stays usable
        }
        printf("hogged %zu\n", held);
        fflush(stdout);
        usleep((useconds_t)(seconds * 1e6));
        return 0;  // the driver frees it all at exit
    }
    if (strcmp(mode, "fault") == 0) {
        int *p;
        cudaMalloc(&p, sizeof(int));
        write_far<<<1, 1>>>(p);
        err = cudaDeviceSynchronize();
        printf("fault %d %s\n", (int)err, cudaGetErrorString(err));
        fflush(stdout);
        usleep((useconds_t)(seconds * 1e6));
        return 3;
    }
    double end = now() + seconds;
    while (now() < end) {
        spin<<<1, 1>>>(20000000LL);
        err = cudaDeviceSynchronize();
        if (err != cudaSuccess) {
            printf("error %d %s\n", (int)err, cudaGetErrorString(err));
            fflush(stdout);
            return 4;
        }
    }
    printf("done\n");
    return 0;
}
