import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd_func.aggregation import GradVac
from torchjd_func.autojac import jac_to_grad, mtl_backward

encoder = Sequential(Linear(10, 5), ReLU())
decoder = Sequential(Linear(5, 3), ReLU())
task1_head, task2_head = Linear(3, 1), Linear(3, 1)
optimizer = SGD([*encoder.parameters(), *decoder.parameters(), *task1_head.parameters(), *task2_head.parameters()], lr=0.1)
loss_fn = MSELoss()
inputs, t1, t2 = torch.randn(8, 16, 10), torch.randn(8, 16, 1), torch.randn(8, 16, 1)

encoder_aggregator = GradVac()
decoder_aggregator = GradVac()

for x, y1, y2 in zip(inputs, t1, t2):
    enc_out = encoder(x)
    dec_out = decoder(enc_out)
    loss1 = loss_fn(task1_head(dec_out), y1)
    loss2 = loss_fn(task2_head(dec_out), y2)
    mtl_backward([loss1, loss2], features=dec_out)
    jac_to_grad(encoder.parameters(), encoder_aggregator)
    jac_to_grad(decoder.parameters(), decoder_aggregator)
    optimizer.step()
    optimizer.zero_grad()
