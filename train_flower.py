"""Train on Flower102 (tfds or KE's image-folder layout) with any ke_tf method.

    python train_flower.py --config configs/flower102_resnet18_ke.yaml
"""
from ke_tf.cli import train_main

main = train_main("configs/flower102_resnet18_ke.yaml", __doc__)

if __name__ == "__main__":
    main()
