"""Train on CIFAR-10/100 (or the offline digits demo) with any ke_tf method.

    python train_cifar.py --config configs/quickstart_digits.yaml
    python train_cifar.py --config configs/cifar10_resnet56.yaml --set train.epochs=10
"""
from ke_tf.cli import train_main

main = train_main("configs/cifar10_resnet56_ekg.yaml", __doc__)

if __name__ == "__main__":
    main()
