"""The input: datasets (synthetic, digits, CIFAR, ImageFolder), image decoding, the resumable
sampler and loaders, and the batch's augmentation on the device. Imports nothing else of the
package but config."""
