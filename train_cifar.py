"""Train on CIFAR-10/100 (or the offline digits demo) with any ke_tf method: `ke-tf-train` with
EKG pruning of ResNet-56 on CIFAR-10 as the default config.

    python train_cifar.py --config digits_resnet20_supervised
    python train_cifar.py --config cifar10_resnet56_supervised --set train.epochs=10
    python train_cifar.py --list
"""

from ke_tf.cli import train_main

main = train_main("cifar10_resnet56_ekg", __doc__)

if __name__ == "__main__":
    main()
