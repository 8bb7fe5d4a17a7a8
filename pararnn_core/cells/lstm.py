"""ParaLSTM: CIFG LSTM with peepholes, state (c, h) per channel (docs/design.md section 1).

    f  = sigmoid(a_f * h + p_f * c + u_f)
    c~ = tanh(a_c * h + u_c)
    c' = f * c + (1 - f) * c~            (input gate = 1 - forget gate)
    o  = sigmoid(a_o * h + p_o * c' + u_o)   (output peephole reads the new c')
    h' = o * tanh(c')

Gate order (f, o, c) and parameter order (a_f, a_o, a_c, p_f, p_o) follow the rows
of Apple's ml-pararnn tensors A [3, N] and C [2, N], so their checkpoints map
without reordering.
"""

from pararnn_core.cell import Cell, Normal, Timescales


class LSTMCell(Cell):
    name = "lstm"
    gates = ("f", "o", "c")
    state = ("c", "h")
    params = {
        "a_f": Normal(0.1),
        "a_o": Normal(0.1),
        "a_c": Normal(0.1),
        "p_f": Normal(0.1),
        "p_o": Normal(0.1),
    }
    gate_bias = {"f": Timescales(kind="retain")}

    def step(self, ops, s, u, p):
        f = ops.sigmoid(p.a_f * s.h + p.p_f * s.c + u.f)
        c_hat = ops.tanh(p.a_c * s.h + u.c)
        c = f * s.c + (1 - f) * c_hat
        o = ops.sigmoid(p.a_o * s.h + p.p_o * c + u.o)
        return c, o * ops.tanh(c)

    def step_and_jacobian(self, ops, s, u, p):
        f = ops.sigmoid(p.a_f * s.h + p.p_f * s.c + u.f)
        c_hat = ops.tanh(p.a_c * s.h + u.c)
        c = f * s.c + (1 - f) * c_hat
        o = ops.sigmoid(p.a_o * s.h + p.p_o * c + u.o)
        tc = ops.tanh(c)
        h = o * tc
        # d/d(c_prev) and d/d(h_prev) of each quantity
        sf = f * (1 - f) * (s.c - c_hat)
        dc_dc = f + sf * p.p_f
        dc_dh = sf * p.a_f + (1 - f) * (1 - c_hat * c_hat) * p.a_c
        so = o * (1 - o)
        dtc = o * (1 - tc * tc)
        dh_dc = (so * p.p_o * tc + dtc) * dc_dc
        dh_dh = so * (p.a_o + p.p_o * dc_dh) * tc + dtc * dc_dh
        return (c, h), [[dc_dc, dc_dh], [dh_dc, dh_dh]]
