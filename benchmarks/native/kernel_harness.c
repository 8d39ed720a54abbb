/*
 * The native CPU kernel without Python: one thread, batch 1, a random 4096 x 4096 (or N x K) W4 group-16 matrix at
 * 50% kept groups (4 copies, rotated), thread CPU time per call. Separates the kernel's own cost from the Python wrapper
 * and from the other jobs of a shared machine (CPU time, not wall time).
 *
 * Built from the kernel files of csrc/ without binding.c (no Python needed), with the flags setup.py uses:
 *   gcc -O3 -std=c11 -fopenmp benchmarks/native/kernel_harness.c csrc/driver.c csrc/kernel_*.c -o /tmp/harness -lm
 *   OMP_NUM_THREADS=1 /tmp/harness        # asymmetric (stored zero points)
 *   OMP_NUM_THREADS=1 /tmp/harness s      # symmetric
 *   OMP_NUM_THREADS=1 /tmp/harness a 16   # batch 16
 *   OMP_NUM_THREADS=1 /tmp/harness a 1 576 576 5000   # batch 1, N x K = 576 x 576, 5000 calls
 *   OMP_NUM_THREADS=1 /tmp/harness a 1 4096 4096 200 16  # 16 copies (105 MB): from DRAM
 *   OMP_NUM_THREADS=1 /tmp/harness a 1 256 4096 4000 1   # one 0.4 MB copy: from L2
 *   OMP_NUM_THREADS=1 /tmp/harness a 1 4096 4096 400 16 1     # int8 activations (linear_a8; VNNI where present)
 *   OMP_NUM_THREADS=1 /tmp/harness a 1 4096 4096 400 16 1 2   # int8 activations, the AVX2 path (isa 2)
 * Arguments: symmetry, batch M, N, K, calls, copies (default 4, at most 64), act8 (0), isa (0 auto, 1 scalar,
 * 2 AVX2, 3 AVX-512). It prints ns per kept group too.
 */
#include "../../csrc/gqsa_cpu.h"
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t); return t.tv_sec+1e-9*t.tv_nsec;}
int main(int argc, char **argv){
  int64_t N=argc>3?atoi(argv[3]):4096,K=argc>4?atoi(argv[4]):4096,g=16,G=K/g; int sym = argc>1 && argv[1][0]=='s';
  int64_t M = argc>2 ? atoi(argv[2]) : 1;
  int copies=argc>6?atoi(argv[6]):4; if(copies<1||copies>64){fprintf(stderr,"copies must be 1..64\n"); return 2;}
  Problem ps[64];
  srand(1);
  float *x=malloc(M*K*4); for(int64_t i=0;i<M*K;i++) x[i]=(float)rand()/RAND_MAX-0.5f;
  float *y=malloc(M*N*4);
  for(int c=0;c<copies;c++){
    int32_t *crow=malloc((N+1)*4); int16_t *col=malloc(N*G*2); crow[0]=0; int64_t nnz=0;
    for(int64_t r=0;r<N;r++){ for(int64_t j=0;j<G;j++) if(rand()&1) col[nnz++]=(int16_t)j; crow[r+1]=(int32_t)nnz; }
    uint8_t *vals=malloc(nnz*8); for(int64_t i=0;i<nnz*8;i++) vals[i]=rand();
    uint16_t *sc=malloc(nnz*2); for(int64_t i=0;i<nnz;i++) sc[i]=0x2000+(rand()&0x3ff);
    uint8_t *z=malloc((nnz+1)/2); for(int64_t i=0;i<(nnz+1)/2;i++) z[i]=rand();
    Problem p={0}; p.x=x; p.crow=crow; p.col=col; p.col_int32=0; p.values=vals; p.scale=sc; p.zero=sym?NULL:z;
    p.zero_nbytes=(nnz*4+7)/8; p.y=y; p.M=M; p.N=N; p.K=K; p.nnz=nnz; p.ldx=K; p.ldq=K; p.g=g; p.bits=4;
    ps[c]=p;
  }
  int act8=argc>7?atoi(argv[7]):0, isa=argc>8?atoi(argv[8]):ISA_AUTO;
  double best=1e9, tot=0; int reps=argc>5?atoi(argv[5]):200;
  for(int r=0;r<reps;r++){ double t=now(); linear(&ps[r%copies],1,MODE_TASK,isa,act8); t=now()-t; tot+=t; if(t<best)best=t; }
  int64_t nz=0; for(int c=0;c<copies;c++) nz+=ps[c].nnz; nz/=copies; printf("%s%s isa %d M=%ld N=%ld K=%ld copies=%d best %.4f ms mean %.4f ms  ns/group best %.3f mean %.3f MB/copy %.2f\n", sym?"sym":"asym", act8?" a8":"", isa, (long)M,(long)N,(long)K,copies, best*1e3, tot/reps*1e3, best*1e9/nz, tot/reps*1e9/nz, nz*12.5/1e6);
  return 0;
}
