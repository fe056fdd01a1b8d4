import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD

from torchjd_func.aggregation import GradVac
from torchjd_func.autojac import jac_to_grad, mtl_backward

encoder = Sequential(Linear(10, 5), ReLU(), Linear(5, 3), ReLU())
task1_head, task2_head = Linear(3, 1), Linear(3, 1)
optimizer = SGD([*encoder.parameters(), *task1_head.parameters(), *task2_head.parameters()], lr=0.1)
loss_fn = MSELoss()
inputs, t1, t2 = torch.randn(8, 16, 10), torch.randn(8, 16, 1), torch.randn(8, 16, 1)

aggregator = GradVac()

for x, y1, y2 in zip(inputs, t1, t2):
    features = encoder(x)
    loss1 = loss_fn(task1_head(features), y1)
    loss2 = loss_fn(task2_head(features), y2)
    mtl_backward([loss1, loss2], features=features)
    jac_to_grad(encoder.parameters(), aggregator)
    optimizer.step()
    optimizer.zero_grad()
