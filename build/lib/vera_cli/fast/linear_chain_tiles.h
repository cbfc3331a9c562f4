/* The chain's products, included by linear_chain.c once per vector width W: 8 floats (AVX2) and 16 (AVX-512,
 * where the processor has it). The includer defines W, NAME(f) (f's name for this width), the vector type VEC
 * and its operations: LOAD, STORE, SET1 (a scalar in every lane), ZERO, FMA, MAX, ADD, REDUCE (the lanes' sum) and
 * KEEP_ABOVE_ZERO(r, m) (r's lanes where m > 0 or m is NaN, zero elsewhere). Every slice's rows are padded to a
 * multiple of 16, a whole number of vectors at either width. */

/* y[a][0:W mv] for a in [a0, a0 + ma): sum_k w[a sa + k sk] x[k][..], started from bias[a] (or zero) or from y
 * itself (accumulate), then the ReLU or the mask applied. */
INLINE void NAME(product_tile)(int ma, int mv, int a0, int v0, int nk, const float *w, long sa, long sk,
                               const float *x, float *y, int ld, int accumulate, const float *bias, int post,
                               const float *m) {
    VEC acc[4][4];
    for (int a = 0; a < ma; a++)
        for (int v = 0; v < mv; v++)
            acc[a][v] = accumulate ? LOAD(y + (long)(a0 + a) * ld + (v0 + v) * W)
                                   : (bias ? SET1(bias[a0 + a]) : ZERO);
    for (int k = 0; k < nk; k++) {
        VEC xs[4];
        for (int v = 0; v < mv; v++) xs[v] = LOAD(x + (long)k * ld + (v0 + v) * W);
        for (int a = 0; a < ma; a++) {
            VEC s = SET1(w[(a0 + a) * sa + k * sk]);
            for (int v = 0; v < mv; v++) acc[a][v] = FMA(s, xs[v], acc[a][v]);
        }
    }
    const VEC zero = ZERO;
    for (int a = 0; a < ma; a++)
        for (int v = 0; v < mv; v++) {
            long at = (long)(a0 + a) * ld + (v0 + v) * W;
            VEC r = acc[a][v];
            if (post == RELU) r = MAX(zero, r); /* this order passes a NaN on, as torch.relu does */
            if (post == MASK) /* not m <= 0: a NaN passes the gradient on, as torch's threshold_backward does */
                r = KEEP_ABOVE_ZERO(r, LOAD(m + at));
            STORE(y + at, r);
        }
}

static void NAME(product)(int na, int nk, const float *w, long sa, long sk, const float *x, float *y, int ld,
                          int accumulate, const float *bias, int post, const float *m) {
    int nv = ld / W;
    for (int a0 = 0; a0 < na; a0 += 4) {
        int ma = na - a0 < 4 ? na - a0 : 4;
        for (int v0 = 0; v0 < nv; v0 += 4) {
            int mv = nv - v0 < 4 ? nv - v0 : 4;
#define TILE(MA, MV) \
    case MA * 8 + MV: NAME(product_tile)(MA, MV, a0, v0, nk, w, sa, sk, x, y, ld, accumulate, bias, post, m); break;
            switch (ma * 8 + mv) {
                TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(1, 4) TILE(2, 1) TILE(2, 2) TILE(2, 3) TILE(2, 4)
                TILE(3, 1) TILE(3, 2) TILE(3, 3) TILE(3, 4) TILE(4, 1) TILE(4, 2) TILE(4, 3) TILE(4, 4)
            }
#undef TILE
        }
    }
}

/* gw[o][i] = sum over rows of g[o][..] h[i][..] for o in [o0, o0 + mo), i in [i0, i0 + mi). */
INLINE void NAME(weight_grad_tile)(int mo, int mi, int o0, int i0, int ni, const float *g, const float *h,
                                   int ld, float *gw) {
    VEC acc[4][3];
    for (int a = 0; a < mo; a++)
        for (int b = 0; b < mi; b++) acc[a][b] = ZERO;
    for (int r = 0; r < ld; r += W) {
        VEC hs[3];
        for (int b = 0; b < mi; b++) hs[b] = LOAD(h + (long)(i0 + b) * ld + r);
        for (int a = 0; a < mo; a++) {
            VEC gs = LOAD(g + (long)(o0 + a) * ld + r);
            for (int b = 0; b < mi; b++) acc[a][b] = FMA(gs, hs[b], acc[a][b]);
        }
    }
    for (int a = 0; a < mo; a++)
        for (int b = 0; b < mi; b++) gw[(o0 + a) * ni + i0 + b] = REDUCE(acc[a][b]);
}

static void NAME(weight_grad)(int no, int ni, const float *g, const float *h, int ld, float *gw, float *gb) {
    for (int o0 = 0; o0 < no; o0 += 4) {
        int mo = no - o0 < 4 ? no - o0 : 4;
        for (int i0 = 0; i0 < ni; i0 += 3) {
            int mi = ni - i0 < 3 ? ni - i0 : 3;
#define TILE(MO, MI) case MO * 4 + MI: NAME(weight_grad_tile)(MO, MI, o0, i0, ni, g, h, ld, gw); break;
            switch (mo * 4 + mi) {
                TILE(1, 1) TILE(1, 2) TILE(1, 3) TILE(2, 1) TILE(2, 2) TILE(2, 3)
                TILE(3, 1) TILE(3, 2) TILE(3, 3) TILE(4, 1) TILE(4, 2) TILE(4, 3)
            }
#undef TILE
        }
    }
    for (int o = 0; o < no; o++) {
        VEC acc = ZERO;
        for (int r = 0; r < ld; r += W) acc = ADD(acc, LOAD(g + (long)o * ld + r));
        gb[o] = REDUCE(acc);
    }
}
