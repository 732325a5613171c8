//! Layouts and views against hand-computed shapes, strides, offsets and element orders.
use kiln_tensor::storage::Storage;
use kiln_tensor::{f16, DType, Device, Error, Layout, Shape, Tensor};
use std::sync::Arc;

/// `[2, 3, 4]` holding 0, 1, …, 23.
fn t234() -> Tensor {
    Tensor::from_vec((0..24).map(|x| x as f32).collect::<Vec<_>>(), [2, 3, 4]).unwrap()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

#[test]
fn contiguous_strides_and_index() {
    let l = Layout::contiguous([2, 3, 4]);
    assert_eq!(l.strides(), &[12, 4, 1]);
    assert_eq!(l.offset(), 0);
    assert_eq!(l.index_of(&[1, 2, 3]), 23);
    assert_eq!(l.index_of(&[1, 0, 2]), 14);
    assert!(l.is_contiguous());
    assert_eq!(l.required_len(), Some(24));
    assert_eq!(Layout::contiguous([5]).strides(), &[1]);
    let scalar = Layout::contiguous(Shape::new(vec![]));
    assert_eq!(scalar.numel(), 1);
    assert_eq!(scalar.required_len(), Some(1));
    assert_eq!(Shape::new(vec![3, 0, 2]).numel(), 0);
    assert_eq!(Shape::new(vec![usize::MAX, 2]).checked_numel(), None);
}

#[test]
fn permute_and_transpose() {
    let t = t234();
    let p = t.permute(&[2, 0, 1]).unwrap();
    assert_eq!(p.dims(), &[4, 2, 3]);
    assert_eq!(p.layout().strides(), &[1, 12, 4]);
    assert!(!p.is_contiguous());
    // p[i, j, k] = t[j, k, i] = 12 j + 4 k + i.
    let want: Vec<f32> = (0..4)
        .flat_map(|i| (0..2).flat_map(move |j| (0..3).map(move |k| (12 * j + 4 * k + i) as f32)))
        .collect();
    assert_eq!(vals(&p), want);

    let m = Tensor::from_vec(vec![0f32, 1., 2., 3., 4., 5.], [2, 3]).unwrap();
    let mt = m.transpose(0, 1).unwrap();
    assert_eq!(mt.dims(), &[3, 2]);
    assert_eq!(mt.layout().strides(), &[1, 3]);
    assert_eq!(vals(&mt), vec![0., 3., 1., 4., 2., 5.]);
    // Transposing twice is the original view.
    assert_eq!(mt.transpose(0, 1).unwrap().layout(), m.layout());

    assert!(matches!(t.permute(&[0, 0, 1]), Err(Error::Layout(_))));
    assert!(matches!(t.permute(&[0, 1]), Err(Error::Layout(_))));
    assert!(matches!(t.permute(&[0, 1, 3]), Err(Error::Layout(_))));
    assert!(matches!(t.transpose(0, 3), Err(Error::Layout(_))));
}

#[test]
fn narrow_moves_the_offset() {
    let t = t234();
    let n = t.narrow(1, 1, 2).unwrap();
    assert_eq!(n.dims(), &[2, 2, 4]);
    assert_eq!(n.layout().strides(), &[12, 4, 1]);
    assert_eq!(n.layout().offset(), 4);
    assert!(!n.is_contiguous());
    assert_eq!(
        vals(&n),
        vec![4., 5., 6., 7., 8., 9., 10., 11., 16., 17., 18., 19., 20., 21., 22., 23.]
    );
    // Narrowing the outer dimension keeps the view contiguous, with an offset.
    let o = t.narrow(0, 1, 1).unwrap();
    assert!(o.is_contiguous());
    assert_eq!(o.layout().offset(), 12);
    assert_eq!(o.as_slice::<f32>().unwrap(), &vals(&t)[12..]);
    // Narrow of a narrow of a permute.
    let q = t
        .permute(&[2, 1, 0])
        .unwrap()
        .narrow(0, 3, 1)
        .unwrap()
        .narrow(1, 2, 1)
        .unwrap();
    assert_eq!(q.dims(), &[1, 1, 2]);
    assert_eq!(q.layout().offset(), 3 + 2 * 4);
    assert_eq!(vals(&q), vec![11., 23.]);
    // Empty and out-of-range narrows.
    let e = t.narrow(2, 4, 0).unwrap();
    assert_eq!(e.dims(), &[2, 3, 0]);
    assert_eq!(e.numel(), 0);
    assert!(vals(&e).is_empty());
    assert!(matches!(t.narrow(2, 3, 2), Err(Error::Layout(_))));
    assert!(matches!(t.narrow(3, 0, 1), Err(Error::Layout(_))));
    assert!(matches!(t.narrow(0, usize::MAX, 2), Err(Error::Layout(_))));
}

#[test]
fn broadcast_uses_stride_zero() {
    let row = Tensor::from_vec(vec![1f32, 2., 3.], [3]).unwrap();
    let b = row.broadcast_as([2, 3]).unwrap();
    assert_eq!(b.layout().strides(), &[0, 1]);
    assert_eq!(vals(&b), vec![1., 2., 3., 1., 2., 3.]);
    let col = Tensor::from_vec(vec![1f32, 2.], [2, 1]).unwrap();
    let c = col.broadcast_as([3, 2, 4]).unwrap();
    assert_eq!(c.layout().strides(), &[0, 1, 0]);
    assert_eq!(vals(&c), [1f32, 1., 1., 1., 2., 2., 2., 2.].repeat(3));
    assert!(!c.is_contiguous());
    assert!(matches!(row.broadcast_as([2, 4]), Err(Error::Layout(_))));
    assert!(matches!(col.broadcast_as([2]), Err(Error::Layout(_))));
    // A broadcast whose element count overflows is an error, not a panic.
    assert!(matches!(
        row.broadcast_as([usize::MAX, 2, 3]),
        Err(Error::Layout(_))
    ));
}

#[test]
fn reshape_only_of_contiguous_data() {
    let t = t234();
    let r = t.reshape([6, 4]).unwrap();
    assert_eq!(r.layout().strides(), &[4, 1]);
    assert_eq!(vals(&r), vals(&t));
    let s = t.narrow(0, 1, 1).unwrap().reshape([3, 4]).unwrap();
    assert_eq!(s.layout().offset(), 12);
    assert_eq!(vals(&s)[0], 12.);
    assert!(matches!(t.reshape([5, 5]), Err(Error::Layout(_))));
    assert!(matches!(
        t.transpose(0, 2).unwrap().reshape([24]),
        Err(Error::Layout(_))
    ));
    assert!(matches!(t.reshape([usize::MAX, 2]), Err(Error::Layout(_))));
    // Size-1 dimensions may carry any stride and still count as contiguous.
    let l = Layout::new([1, 4], vec![99, 1], 0).unwrap();
    assert!(l.is_contiguous());
}

#[test]
fn contiguous_copies_only_when_needed() {
    let t = t234();
    let same = t.contiguous().unwrap();
    assert_eq!(
        same.as_bytes().unwrap().as_ptr(),
        t.as_bytes().unwrap().as_ptr()
    );
    let p = t.permute(&[1, 2, 0]).unwrap();
    let c = p.contiguous().unwrap();
    assert!(c.is_contiguous());
    assert_eq!(c.layout().strides(), &[8, 2, 1]);
    assert_eq!(c.as_slice::<f32>().unwrap(), vals(&p).as_slice());
    // contiguous_owned always copies, into writable memory.
    let mut o = t.contiguous_owned().unwrap();
    assert_ne!(
        o.as_bytes().unwrap().as_ptr(),
        t.as_bytes().unwrap().as_ptr()
    );
    o.as_mut_slice::<f32>().unwrap()[0] = 100.;
    assert_eq!(vals(&t)[0], 0.);
    assert_eq!(vals(&o)[0], 100.);
}

#[test]
fn writes_need_unique_owned_storage() {
    let mut t = t234();
    let view = t.clone();
    assert!(t.as_mut_slice::<f32>().is_err(), "shared with `view`");
    drop(view);
    t.as_mut_slice::<f32>().unwrap()[1] = -1.;
    assert_eq!(vals(&t)[1], -1.);
    assert!(t.as_mut_slice::<i32>().is_err(), "wrong dtype");
    let mut p = t.permute(&[2, 1, 0]).unwrap();
    assert!(p.as_mut_slice::<f32>().is_err(), "non-contiguous");
    // Storage borrowed from a shared owner (as a memory map is) is read-only.
    let owner: kiln_tensor::SharedBytes = Arc::new(vec![0u8; 64]);
    let mut b = Tensor::from_shared_bytes(owner, 0, 16, DType::F32, [4]).unwrap();
    assert!(b.is_borrowed());
    assert!(b.as_mut_slice::<f32>().is_err());
}

#[test]
fn typed_access_checks_dtype_and_layout() {
    let t = t234();
    assert!(matches!(
        t.as_slice::<f16>(),
        Err(Error::DTypeMismatch { .. })
    ));
    assert!(matches!(
        t.permute(&[1, 0, 2]).unwrap().as_slice::<f32>(),
        Err(Error::Layout(_))
    ));
    assert!(t.permute(&[1, 0, 2]).unwrap().as_bytes().is_err());
    let b = Tensor::zeros([3], DType::Bool).unwrap();
    assert_eq!(b.to_vec::<u8>().unwrap(), vec![0, 0, 0], "bool reads as u8");
    assert!(b.to_f32_vec().is_err());
    let e = t
        .expect_dims("h.0.attn.c_attn.weight", &[2, 4, 3])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "h.0.attn.c_attn.weight: expected shape [2, 4, 3], found [2, 3, 4]"
    );
    assert!(t.expect_dims("x", &[2, 3, 4]).is_ok());
}

#[test]
fn construction_errors_are_errors() {
    assert!(Tensor::from_vec(vec![1f32, 2., 3.], [2, 2]).is_err());
    assert!(Tensor::zeros([usize::MAX, 3], DType::F32).is_err());
    assert!(Tensor::zeros([usize::MAX / 2], DType::F32).is_err());
    assert!(Layout::new([2, 3], vec![1], 0).is_err());
    assert!(Layout::new([usize::MAX, 3], vec![3, 1], 0).is_err());
    // A layout that reaches past its storage is refused.
    let storage = Arc::new(Storage::Cpu(kiln_tensor::AlignedBuffer::zeroed(16)));
    let fits = Layout::new([2, 2], vec![2, 1], 0).unwrap();
    assert!(Tensor::from_parts(storage.clone(), fits, DType::F32).is_ok());
    let past = Layout::new([2, 2], vec![2, 1], 1).unwrap();
    assert!(Tensor::from_parts(storage.clone(), past, DType::F32).is_err());
    let huge = Layout::new([2, 2], vec![usize::MAX / 2, 1], 0).unwrap();
    assert!(Tensor::from_parts(storage, huge, DType::F32).is_err());
    // Shared bytes: wrong length or range are errors.
    let owner: kiln_tensor::SharedBytes = Arc::new(vec![0u8; 10]);
    assert!(Tensor::from_shared_bytes(owner.clone(), 0, 12, DType::F32, [3]).is_err());
    assert!(Tensor::from_shared_bytes(owner.clone(), 4, 8, DType::F32, [3]).is_err());
    assert!(Tensor::from_shared_bytes(owner, 8, 8, DType::F32, [2]).is_err());
}

#[test]
fn owned_storage_is_64_byte_aligned_and_on_the_cpu() {
    for n in [1usize, 7, 33, 257] {
        let t = Tensor::zeros([n], DType::BF16).unwrap();
        assert_eq!(t.as_bytes().unwrap().as_ptr() as usize % 64, 0);
        assert_eq!(t.device(), Device::Cpu);
        let c = Tensor::from_vec(vec![0u8; n], [n]).unwrap();
        assert_eq!(c.as_bytes().unwrap().as_ptr() as usize % 64, 0);
    }
}

#[test]
fn misaligned_shared_bytes_are_copied_once() {
    // Bytes 1..17 of an owner: the f32 view would be misaligned, so it is copied.
    let mut raw = vec![0u8; 20];
    for (i, x) in [1.5f32, -2.0, 3.0, 4.25].iter().enumerate() {
        raw[1 + 4 * i..5 + 4 * i].copy_from_slice(&x.to_le_bytes());
    }
    let owner: kiln_tensor::SharedBytes = Arc::new(kiln_tensor::AlignedBuffer::from_bytes(&raw));
    let t = Tensor::from_shared_bytes(owner.clone(), 1, 16, DType::F32, [2, 2]).unwrap();
    assert!(!t.is_borrowed());
    assert_eq!(vals(&t), vec![1.5, -2.0, 3.0, 4.25]);
    // u8 is never misaligned.
    let u = Tensor::from_shared_bytes(owner, 1, 3, DType::U8, [3]).unwrap();
    assert!(u.is_borrowed());
}

#[test]
fn storage_indices_follow_row_major_logical_order() {
    let l = Layout::new([2, 3], vec![1, 2], 5).unwrap();
    assert_eq!(
        l.storage_indices().collect::<Vec<_>>(),
        vec![5, 7, 9, 6, 8, 10]
    );
    let b = Layout::new([2, 2, 2], vec![0, 3, 1], 1).unwrap();
    assert_eq!(
        b.storage_indices().collect::<Vec<_>>(),
        vec![1, 2, 4, 5, 1, 2, 4, 5]
    );
    let e = Layout::new([2, 0], vec![1, 1], 0).unwrap();
    assert_eq!(e.storage_indices().count(), 0);
    let s = Layout::contiguous(Shape::new(vec![]));
    assert_eq!(s.storage_indices().collect::<Vec<_>>(), vec![0]);
}
